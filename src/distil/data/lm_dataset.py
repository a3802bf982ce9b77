"""A user's language-model dataset, from files or a `save_to_disk` folder to training and held-out rows.

    data = load_lm_dataset("chats.jsonl", tokenizer, format="chat", max_length=1024, packing=True, eval_fraction=0.05)
    distil.distill(teacher, student, data.train, eval_data=data.eval, tokenizer=tokenizer, ...)

Rows are dicts of token lists: `input_ids` and `labels` (-100 where a token is not trained on), plus `position_ids`
for packed blocks. The held-out rows are never packed, so each is scored on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from distil.data.builtin import BUILTIN, builtin_rows
from distil.data.files import read_rows, resolve_paths
from distil.data.formats import Columns, Example, Tally, tokenize_rows
from distil.data.packing import pack_examples
from distil.errors import DistilError


@dataclass
class LMDataset:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    tally: Tally  # what tokenizing kept, truncated and dropped (training and held-out rows together)
    packed: bool
    examples: list[dict[str, list[int]]]  # the training examples one by one (as `train` when not packed)

    def describe(self) -> str:
        blocks = " in packed blocks" if self.packed else ""
        return f"data: {self.tally.describe()}; {len(self.train)} training rows{blocks}, {len(self.eval)} held out"


def load_lm_dataset(path: str | list[str], tokenizer: Any, *, format: str = "text", columns: Columns | None = None,
                    split: str | None = None, max_length: int = 512, packing: bool = False,
                    eval_path: str | list[str] | None = None, eval_fraction: float = 0.0, seed: int = 0,
                    max_examples: int | None = None) -> LMDataset:
    """Read (files, a save_to_disk folder, or a built-in dataset's name: distil.data.builtin), tokenize (format text,
    prompt_completion or chat; see distil.data.formats), truncate to max_length and
    split: `eval_path`'s rows are held out, else a seeded `eval_fraction` of the rows. With `packing`, the training
    examples are packed into blocks of max_length tokens, attention kept inside each example."""
    columns = columns or Columns()
    rows, held = split_rows(path, split=split, eval_path=eval_path, eval_fraction=eval_fraction, seed=seed,
                            max_examples=max_examples)
    train, tally = tokenize_rows(rows, tokenizer, format, max_length=max_length, columns=columns, source="data")
    held_examples: list[Example] = []
    if held:
        held_examples, held_tally = tokenize_rows(held, tokenizer, format, max_length=max_length, columns=columns,
                                                  source="held-out data")
        tally.rows += held_tally.rows
        tally.truncated += held_tally.truncated
        tally.dropped.update(held_tally.dropped)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in train]
    train_rows = examples
    if packing:
        train_rows = [{"input_ids": e.input_ids, "labels": e.labels, "position_ids": pos}
                      for e, pos in pack_examples(train, max_length)]
    eval_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in held_examples]
    return LMDataset(train_rows, eval_rows, tally, packing, examples)


def split_rows(path: str | list[str], *, split: str | None = None, eval_path: str | list[str] | None = None,
               eval_fraction: float = 0.0, seed: int = 0, max_examples: int | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows), untokenized: `eval_path`'s rows are held out, else a seeded `eval_fraction`
    of the first `max_examples` rows of `path`."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DistilError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    rows = _rows(path, split, "data.path")
    if max_examples is not None:
        rows = rows[:max_examples]
    held: list[dict[str, Any]] = []
    if eval_path is not None:
        held = _rows(eval_path, split, "data.eval_path")
    elif eval_fraction:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n = max(1, round(eval_fraction * len(rows)))
        chosen = set(order[:n])
        held = [rows[i] for i in sorted(chosen)]
        rows = [r for i, r in enumerate(rows) if i not in chosen]
    if not rows:
        raise DistilError(f"data: {len(held)} rows, all held out for evaluation: none left to train on; give more "
                          "rows, or the held-out ones in eval_path")
    return rows, held


def _rows(path: str | list[str], split: str | None, what: str) -> list[dict[str, Any]]:
    """The rows of files, a save_to_disk folder, or a built-in dataset named instead (distil.data.builtin)."""
    if isinstance(path, str) and path in BUILTIN:
        return builtin_rows(path)
    return read_rows(resolve_paths(path, what), split)
