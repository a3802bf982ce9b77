"""Objectives: turn a batch into named loss terms, for the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distil.distill.pair import Teacher
from distil.losses import dkd
from distil.losses.registry import divergence_spec
from distil.train.objective import Objective, teacher_models


@dataclass(frozen=True)
class LogitLoss:
    """How a student learns from a teacher's outputs:
    total = alpha * [T^2] * divergence(student, teacher; T) + (1 - alpha) * hard-label cross-entropy.

    `divergence` names an entry of distil.losses.registry (or "dkd", which carries T^2 itself); `beta` is the JSD's
    parameter and `skew` the skew KLs' alpha. `fused` / `chunk_size`: the chunked LM-head path of language models;
    `embedding`: the sentence-embedding term of encoders (cosine or mse)."""

    divergence: str = "forward_kl"
    alpha: float = 0.5
    temperature: float = 2.0
    scale_by_t2: bool = True
    beta: float = 0.5
    skew: float = 0.1
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    fused: bool = True
    chunk_size: int | None = None
    embedding: str = "cosine"


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labelled rows (label >= 0) and divided by all rows: unlabelled rows of a transfer
    set add zero, so micro-batches accumulate exactly (8 x 1 equals 1 x 8) and a batch without labels gives 0."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum") / max(len(labels), 1)


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors move; raw inputs (texts, read by the model's own tokenizer) stay as they are."""
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def soft_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    spec: LogitLoss,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The teacher's soft term of a recipe: divergence at temperature T, times T^2 when `scale_by_t2` (DKD: its own)."""
    T = spec.temperature
    if spec.divergence == "dkd":
        if labels is None:
            raise ValueError("dkd needs labels")
        return dkd(student_logits, teacher_logits, labels, alpha=spec.dkd_alpha, beta=spec.dkd_beta, temperature=T)
    params = divergence_params(spec)
    value = divergence_spec(spec.divergence).plain(student_logits, teacher_logits, temperature=T, mask=mask, **params)
    return value * (T * T) if spec.scale_by_t2 else value


# The loss section's field that holds each divergence parameter, where the names differ (alpha is the soft weight).
RECIPE_FIELDS = {"alpha": "skew"}


def divergence_params(spec: LogitLoss) -> dict[str, float]:
    """The recipe's values of its divergence's parameters (beta for JSD, the skew for skew KLs)."""
    names = divergence_spec(spec.divergence).params
    return {name: getattr(spec, RECIPE_FIELDS.get(name, name)) for name in names}


class ClassifierObjective(Objective):
    """alpha * soft term + (1 - alpha) * cross-entropy on a classifier; without a teacher, cross-entropy alone."""

    unit = "samples"

    def __init__(self, student: nn.Module, teacher: Teacher | None, spec: LogitLoss, device: torch.device):
        self.student, self.teacher, self.spec, self.device = student, teacher, spec, device
        self.modules = {"student": student}

    def teachers(self) -> dict[str, nn.Module]:
        return teacher_models(teacher=self.teacher)

    def weight(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def _student_pass(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch on the device, the student's logits and their cross-entropy with the labels."""
        x, y = to_device(batch[0], self.device), batch[1].to(self.device, non_blocking=True)
        logits = self.student(x)
        return x, y, logits, labelled_cross_entropy(logits, y)

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y, logits, ce = self._student_pass(batch)
        if self.teacher is None:
            return {"loss": ce, "ce": ce}
        soft = soft_term(logits, self.teacher(x), y, self.spec)
        alpha = self.spec.alpha
        return {"loss": alpha * soft + (1 - alpha) * ce, "ce": ce, "kd": soft}
