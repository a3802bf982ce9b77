"""Evaluation data and scores for exported students, the same for a PyTorch model and an onnxruntime session.

A *runner* is any callable from a batch (a tensor of images, or a dict of `input_ids` and `attention_mask`) to
logits as a torch tensor, so one scoring function serves every runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from distil.errors import DistilError

Runner = Callable[[Any], torch.Tensor]


# ------------------------------------------------------------------------------------------------- classifiers
def classifier_eval_data(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The recipe's evaluation split (test-set images and labels), as the classification task evaluates it."""
    from distil.data.sources.vision import load_vision

    recipe = _recipe(run_dir)
    data = load_vision(recipe.data.name, recipe.data.path, recipe.seed)
    n = recipe.data.eval_size or len(data.test_y)
    return data.test_x[:n], data.test_y[:n], f"{n} {recipe.data.name} test-set images"


@torch.inference_mode()
def classifier_logits(run: Runner, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([run(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


# ----------------------------------------------------------------------------------------------- language models
def _recipe(run_dir: Path) -> Any:
    from distil.config.load import validate_recipe

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise DistilError(f"{run_dir} has no recipe.yaml, so its evaluation data is unknown; is it a run directory?")
    return validate_recipe(yaml.safe_load(path.read_text()))


def lm_eval_batches(run_dir: Path, tokenizer: Any, *, batch_size: int = 8,
                    max_blocks: int = 32) -> tuple[list[dict[str, torch.Tensor]], str]:
    """The recipe's held-out text, packed into blocks exactly as the causal_lm task evaluates it (every position real
    text), at most `max_blocks` of them, in batches of `batch_size`; and a line that says what they are."""
    from distil.data.sources.text import load_corpus

    recipe = _recipe(run_dir)
    blocks = load_corpus(recipe.data, tokenizer).eval[:max_blocks]
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks.split(batch_size)]
    return batches, (f"{blocks.numel()} held-out tokens of {', '.join(recipe.data.eval)} "
                     f"({len(blocks)} blocks of {blocks.shape[1]})")


def lm_batches(tokenizer: Any, texts: list[str], *, max_length: int = 128, batch_size: int = 8,
               max_texts: int = 32) -> list[dict[str, torch.Tensor]]:
    """Tokenized, right-padded batches of up to `max_texts` texts, each cut to `max_length` tokens."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    texts = texts[:max_texts]
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()})
    if not batches or all(int(b["attention_mask"].sum()) < 2 for b in batches):
        raise DistilError("the evaluation texts tokenize to fewer than 2 tokens; give longer texts")
    return batches


@torch.inference_mode()
def lm_scores(run: Runner, batches: list[dict[str, torch.Tensor]], reference: list[torch.Tensor] | None = None,
              vocab: int | None = None) -> dict[str, Any]:
    """Perplexity of next-token prediction over the unpadded positions; with `reference` (the teacher's logits for
    each batch), top-1 next-token agreement with it over the same positions. `vocab` limits both to the first
    `vocab` logits (the vocabulary teacher and student share, when one has padding rows)."""
    nll, count, agree, total = 0.0, 0, 0, 0
    for i, batch in enumerate(batches):
        logits = run(batch)[..., :vocab].float()
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        keep = mask[:, 1:] & mask[:, :-1]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        nll -= float(target[keep].double().sum())
        count += int(keep.sum())
        if reference is not None:
            agree += int((logits.argmax(-1) == reference[i][..., :vocab].argmax(-1))[mask].sum())
            total += int(mask.sum())
    scores: dict[str, Any] = {"perplexity": math.exp(nll / count)}
    if reference is not None:
        scores["agreement"] = agree / total
    return scores


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Largest |a - b|, over the positions `mask` keeps (padding positions produce logits nobody reads)."""
    diff = (a.float() - b.float()).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max()) if diff.numel() else 0.0
