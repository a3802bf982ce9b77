"""A user's language-model dataset in a recipe (`data.kind: dataset`): files or a `save_to_disk` folder, in format
text, prompt_completion or chat, tokenized with the teacher's tokenizer (distil.data.lm_dataset), packed or padded.

Held-out examples are scored on their trained tokens only (assistant turns, completions), one example per row."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from distil.config.schema import DatasetData
from distil.data.builtin import BUILTIN
from distil.data.files import resolve_paths
from distil.data.formats import IGNORE, Columns, Example, Tally, prompt_length
from distil.data.lm_dataset import load_lm_dataset, split_rows
from distil.data.packing import packed_batch, padded_batch, padded_batches
from distil.data.sources.base import DataSource, LoadedData
from distil.errors import DistilError

TEXT_PROMPT_TOKENS = 32  # format text has no prompt: a held-out document's first tokens stand in for one


@dataclass
class DatasetCorpus:
    """Tokenized training rows (packed blocks or single examples) and held-out examples."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    examples: list[dict[str, list[int]]]  # the training examples one by one (their prompts, for generation)
    packed: bool
    max_length: int
    pad_id: int
    tally: Tally
    tokenizer: Any

    def describe(self) -> str:
        rows = f"{len(self.train)} packed blocks of up to {self.max_length} tokens" if self.packed else \
            f"{len(self.train)} training examples of up to {self.max_length} tokens"
        return f"data: {self.tally.describe()}; {rows}, {len(self.eval)} held-out examples"

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        rows = [self.train[int(i)] for i in indices]
        if self.packed:
            batch = packed_batch([(Example(r["input_ids"], r["labels"]), r["position_ids"]) for r in rows],
                                 self.pad_id, self.max_length)
        else:
            batch = padded_batch([Example(r["input_ids"], r["labels"]) for r in rows], self.pad_id)
        return {"id": indices, **batch}

    def eval_batches(self, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
        """The held-out examples, right-padded in batches; only their trained tokens are scored."""
        return padded_batches([Example(r["input_ids"], r["labels"]) for r in self.eval], self.pad_id, batch_size)

    def eval_key(self) -> str:
        """A digest of the held-out tokens and labels: same digest, same evaluation."""
        digest = hashlib.sha256()
        for row in self.eval:
            digest.update(repr((row["input_ids"], row["labels"])).encode())
        return digest.hexdigest()

    def prompt_pairs(self, rows: list[dict[str, list[int]]]) -> list[tuple[str, str]]:
        """(prompt, reference answer) of each example, as text: the prompt is what the model sees before the first
        trained token (the rendered chat up to the assistant's turn, or the prompt column); the reference is the
        first trained span. A text document is split after its first TEXT_PROMPT_TOKENS tokens."""
        pairs = []
        for row in rows:
            ids, labels = row["input_ids"], row["labels"]
            first = prompt_length(labels)
            if first == 0:
                first = min(TEXT_PROMPT_TOKENS, len(ids) // 2)
            end = next((i for i in range(first, len(ids)) if labels[i] == IGNORE), len(ids))
            pairs.append((self.tokenizer.decode(ids[:first]),
                          self.tokenizer.decode(ids[first:end], skip_special_tokens=True)))
        return pairs

    def sample_prompts(self, count: int) -> list[str]:
        """`count` held-out prompts, evenly spaced, for generations side by side."""
        step = max(1, len(self.eval) // max(count, 1))
        return [prompt for prompt, _ in self.prompt_pairs(self.eval[::step][:count])]


def problems(spec: DatasetData) -> list[str]:
    found = []
    for paths, key in ((spec.path, "data.path"), (spec.eval_path, "data.eval_path")):
        if paths is not None:
            try:
                if isinstance(paths, str) and paths in BUILTIN:
                    BUILTIN[paths].path()
                else:
                    resolve_paths(paths, key)
            except DistilError as exc:
                found.append(str(exc))
    return found


def dataset_rows(spec: DatasetData, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows), untokenized: the split `_load` tokenizes, for readers of the rows themselves
    (two tokenizers, benchmarks)."""
    return split_rows(spec.path, split=spec.split, eval_path=spec.eval_path,
                      eval_fraction=0.0 if spec.eval_path else spec.eval_fraction, seed=seed,
                      max_examples=spec.max_examples)


def _load(spec: DatasetData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    if tokenizer is None:
        raise DistilError("dataset data is tokenized with the teacher's tokenizer; pass tokenizer=")
    data = load_lm_dataset(spec.path, tokenizer, format=spec.format, columns=Columns(**spec.columns.model_dump()),
                           split=spec.split, max_length=spec.max_length, packing=spec.packing,
                           eval_path=spec.eval_path, eval_fraction=0.0 if spec.eval_path else spec.eval_fraction,
                           seed=seed, max_examples=spec.max_examples)
    if not data.eval:
        raise DistilError("data: no held-out example to evaluate on; give data.eval_path or raise data.eval_fraction")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    corpus = DatasetCorpus(data.train, data.eval[: spec.eval_examples], data.examples, data.packed, spec.max_length, pad,
                           data.tally, tokenizer)
    return LoadedData(train=corpus.train, eval=corpus.eval, collate=corpus.batch, size=len(corpus.train),
                      corpus=corpus)


SOURCE = DataSource(problems=problems, load=_load)
