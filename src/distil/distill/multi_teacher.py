"""Several teachers for one student: a mixture teacher, or one soft term per teacher.

`TeacherMixture` drops in wherever one teacher goes: its output z_mix satisfies softmax(z_mix / T) = sum_i w_i
softmax(z_i / T) (distil.losses.multi_teacher.combine_teacher_logits), so the recipe's divergence at temperature T
sees exactly the weighted average of the teachers' softened distributions. `MultiTeacherObjective` instead sums
w_i * soft_term(student, teacher_i), one term per teacher, each logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distil.distill.objectives import ClassifierObjective, LogitLoss, soft_term
from distil.distill.pair import Teacher
from distil.losses.multi_teacher import _weights, combine_teacher_logits
from distil.train.objective import teacher_models


class TeacherMixture(nn.Module):
    """Runs every teacher and returns the logits of their mixture at `temperature`."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None, temperature: float) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.weights = _weights(weights, len(teachers))
        self.temperature = temperature

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = [teacher(*args, **kwargs) for teacher in self.teachers]
        return combine_teacher_logits(logits, self.weights, temperature=self.temperature)


class MultiTeacherObjective(ClassifierObjective):
    """alpha * sum_i w_i * soft_term(student, teacher_i) + (1 - alpha) * CE, weights normalised to sum 1."""

    def __init__(self, student: nn.Module, teachers: Sequence[Teacher], weights: Sequence[float] | None,
                 spec: LogitLoss, device: torch.device) -> None:
        super().__init__(student, None, spec, device)
        self.members = list(teachers)
        self.weights = _weights(weights, len(self.members))

    def teachers(self) -> dict[str, nn.Module]:
        return teacher_models(**{f"teacher{i}": t for i, t in enumerate(self.members)})

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y, logits, ce = self._student_pass(batch)
        terms: dict[str, torch.Tensor] = {"ce": ce}
        kd = torch.zeros((), device=logits.device)
        for i, (teacher, w) in enumerate(zip(self.members, self.weights)):
            value = soft_term(logits, teacher(x), y, self.spec)
            terms[f"kd_teacher{i}"] = value
            kd = kd + w * value
        terms["kd"] = kd
        terms["loss"] = self.spec.alpha * kd + (1 - self.spec.alpha) * ce
        return terms
