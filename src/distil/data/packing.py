"""Batches of token examples: padded, or packed several to a block with attention kept inside each example.

Packed blocks carry per-example `position_ids` (restarting at 0) and no attention mask: Hugging Face models then
attend block-diagonally (transformers' masking finds the example boundaries from the position ids), so an example
sees only its own tokens, as it would alone. The first token of each example gets label -100: it would be predicted
from the previous example's last token. Padding is never trained on (label -100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distil.data.formats import IGNORE, Example


def pack_examples(examples: Sequence[Example], block: int) -> list[tuple[Example, list[int]]]:
    """Examples (each at most `block` tokens) grouped in order into blocks of at most `block` tokens:
    [(packed example, the position ids)], a new block started whenever the next example does not fit."""
    blocks: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        if n > block:
            raise ValueError(f"an example of {n} tokens does not fit a block of {block}: truncate first")
        if len(ids) + n > block:
            blocks.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids += example.input_ids
        labels += [IGNORE] + example.labels[1:]  # predicted from the previous example: not counted
        positions += list(range(n))
    if ids:
        blocks.append((ids, labels, positions))
    return [(Example(i, lab), pos) for i, lab, pos in blocks]


def padded_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padded_batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The examples in order, `batch_size` to a right-padded batch."""
    return [padded_batch(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def packed_batch(blocks: Sequence[tuple[Example, list[int]]], pad_id: int, block: int) -> dict[str, Any]:
    """Packed blocks padded to `block` tokens: input_ids, labels, position_ids (the padding is one more, untrained
    'example'), no attention_mask, and token_mask (1 on real tokens, for losses on hidden states)."""
    ids = torch.full((len(blocks), block), pad_id, dtype=torch.long)
    real = torch.zeros((len(blocks), block), dtype=torch.long)
    labels = torch.full((len(blocks), block), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(blocks), block), dtype=torch.long)
    for row, (example, pos) in enumerate(blocks):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        positions[row, :n] = torch.tensor(pos)
        positions[row, n:] = torch.arange(block - n)
        real[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": None, "token_mask": real}


def token_mask(batch: dict[str, Any]) -> torch.Tensor:
    """1 on the real tokens of a padded or packed batch, 0 on padding."""
    mask = batch.get("attention_mask")
    return mask if mask is not None else batch["token_mask"]


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """What a Hugging Face model's forward takes from a batch: ids with their attention mask, or packed ids with
    their position ids."""
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"].to(device)
    return inputs
