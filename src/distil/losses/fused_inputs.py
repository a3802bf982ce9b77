"""Checks and flattening of the fused LM-head losses' inputs: shapes, dtypes, masks and hard labels, each refused with
a message that names the fix, before any chunk runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from distil.errors import DistilError
from distil.losses.logits import _check_temperature
from distil.losses.registry import divergence_spec


def _flat_rows(hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    rows = hidden.reshape(-1, hidden.shape[-1])
    return rows if keep is None else rows[keep]


def _check_mask(mask: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != lead:
        raise DistilError(
            f"mask must be a bool tensor of shape {tuple(lead)} (the hidden states without the last dimension), got "
            f"{mask.dtype} {tuple(mask.shape)}; build it as labels != -100"
        )
    return mask.reshape(-1)


def _kept_labels(labels: torch.Tensor, lead: torch.Size, vocab: int, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check hard labels against the hidden states' leading shape and a head of ``vocab`` rows; return the flat mask
    of the labelled positions and their labels."""
    if labels.shape != lead or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DistilError(
            f"labels must be integer class indices of shape {tuple(lead)} (the hidden states without the last "
            f"dimension), got {labels.dtype} {tuple(labels.shape)}"
        )
    flat = labels.reshape(-1)
    keep = flat != ignore_index
    targets = flat[keep]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise DistilError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found "
            f"{int(targets.min())}..{int(targets.max())}"
        )
    return keep, targets


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dtype != weight.dtype:
        raise DistilError(
            f"{name} hidden states are {hidden.dtype} but its LM-head weight is {weight.dtype}; cast one to the other"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise DistilError(
            f"{name} LM-head weight {tuple(weight.shape)} does not fit hidden states {tuple(hidden.shape)}; the weight "
            "must be [vocab, hidden] (model.lm_head.weight) and the hidden states the final ones, after the last norm"
        )


@dataclass
class _HeadPair:
    """A checked student/teacher pair of hidden states and LM heads, with the kept rows and shared vocabulary."""

    hs: torch.Tensor  # kept student rows [N, H_s]
    ws: torch.Tensor  # student head over the shared vocabulary (keeps the autograd link)
    ht: torch.Tensor  # kept teacher rows [N, H_t], detached
    wt: torch.Tensor
    vocab_size: int
    kernel: Callable
    params: dict[str, float]


def _head_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature, mask,
               vocab_size, divergence_params) -> _HeadPair:
    """Check a student/teacher pair of hidden states and heads; keep the masked rows and the shared vocabulary."""
    spec = divergence_spec(divergence)
    divergence_params = spec.resolve(divergence_params)  # missing parameters take the plain function's defaults
    _check_temperature(temperature)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise DistilError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} cover different positions; they need the same leading dimensions"
        )
    _check_head("student", student_hidden, student_weight)
    _check_head("teacher", teacher_hidden, teacher_weight)
    if vocab_size is None:
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise DistilError(
                f"student vocabulary {student_weight.shape[0]} differs from the teacher's {teacher_weight.shape[0]}; "
                "pass vocab_size= the shared vocabulary when they differ only by padding rows"
            )
        vocab_size = student_weight.shape[0]
    elif not 0 < vocab_size <= min(student_weight.shape[0], teacher_weight.shape[0]):
        raise DistilError(
            f"vocab_size={vocab_size} must be in 1..{min(student_weight.shape[0], teacher_weight.shape[0])} "
            "(the smaller of the two vocabularies)"
        )
    keep = _check_mask(mask, lead)
    hs = _flat_rows(student_hidden, keep)
    ht = _flat_rows(teacher_hidden.detach(), keep)
    wt = teacher_weight.detach()[:vocab_size]
    # Slicing keeps the autograd link (padding rows beyond vocab_size get a zero gradient); no slice when not needed,
    # since its backward would allocate another weight-sized tensor.
    ws = student_weight if vocab_size == student_weight.shape[0] else student_weight[:vocab_size]
    return _HeadPair(hs, ws, ht, wt, vocab_size, spec.kernel, divergence_params)
