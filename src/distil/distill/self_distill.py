"""Self-distillation objectives: the student teaches itself.

- Mean teacher (`EMAObjective`): an exponential moving average of the student's weights is the teacher.
- Deep supervision (`DeepSupervisionObjective`, "Be Your Own Teacher", Zhang et al. 2019): exits on shallower blocks
  learn from the labels, from the deepest classifier's softened outputs and from its features.
- Born-again networks need no objective of their own: generation k is a ClassifierObjective whose teacher is
  generation k-1 (its loss: `distil.config.adapt.self_distill_loss`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from distil.distill.objectives import LogitLoss, labelled_cross_entropy, soft_term, to_device
from distil.losses import forward_kl
from distil.models.exits import Exits, exit_outputs
from distil.train.objective import Objective


class EMATeacher(nn.Module):
    """A frozen copy of the student whose weights follow theirs: ema <- d * ema + (1 - d) * student.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates (n = updates so far), so
    the early, fast-changing student is not averaged with its random initialisation for long. Floating-point buffers
    (batch-norm statistics) are averaged the same way; others (counters) are copied. `updates` is a buffer, so the
    whole state is in `state_dict()` and a checkpoint restores it exactly. Always in eval mode, never builds a graph.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        super().__init__()
        self.model = copy.deepcopy(student)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        super().train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        n = int(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for ema, new in zip(self.model.parameters(), student.parameters()):
            ema.lerp_(new.detach(), 1.0 - d)
        for ema, new in zip(self.model.buffers(), student.buffers()):
            if ema.dtype.is_floating_point:
                ema.lerp_(new, 1.0 - d)
            else:
                ema.copy_(new)
        self.updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.model.eval()
        with torch.no_grad():
            return self.model(*args, **kwargs)


class EMAObjective(Objective):
    """alpha * [T^2] * divergence(student, EMA teacher) + (1 - alpha) * CE.

    The loop has no post-step hook, so the average is updated in `prepare`, before each step, from the weights the
    previous optimizer step produced. A checkpoint is written at a step boundary, so the EMA it holds is exactly the
    one the next step starts from."""

    unit = "samples"

    def __init__(self, student: nn.Module, loss: LogitLoss, device: torch.device, *, decay: float = 0.99) -> None:
        self.student, self.device, self.loss_spec = student, device, loss
        self.ema = EMATeacher(student, decay).to(device)
        self.modules = {"student": student, "ema": self.ema}

    def weight(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def prepare(self, batches: list[Any], step: int) -> list[Any]:
        self.ema.update(self.student)
        return batches

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = to_device(batch[0], self.device), batch[1].to(self.device, non_blocking=True)
        logits = self.student(x)
        ce = labelled_cross_entropy(logits, y)
        soft = soft_term(logits, self.ema(x), y, self.loss_spec)
        alpha = self.loss_spec.alpha
        return {"loss": alpha * soft + (1 - alpha) * ce, "ce": ce, "kd": soft}


class DeepSupervisionObjective(Objective):
    """BYOT: CE on the deepest classifier; every shallower exit i adds
    (1 - alpha) * CE(q_i, y) + alpha * T^2 * KL(q_deepest^T || q_i^T) + feature_weight * ||F_i - F_deepest||^2.

    The deepest outputs and features are targets (detached): the exits learn from them, not the reverse."""

    unit = "samples"

    def __init__(self, student: nn.Module, exits: Exits, device: torch.device, *, alpha: float = 0.3,
                 temperature: float = 3.0, feature_weight: float = 0.03) -> None:
        self.student, self.exits, self.device = student, exits, device
        self.alpha, self.temperature, self.feature_weight = alpha, temperature, feature_weight
        self.modules = {"student": student, "exits": exits}

    def weight(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = to_device(batch[0], self.device), batch[1].to(self.device, non_blocking=True)
        logits, deepest, outs = exit_outputs(self.student, self.exits, x)
        ce = labelled_cross_entropy(logits, y)
        target, features = logits.detach(), deepest.detach()
        T, a = self.temperature, self.alpha
        exit_ce = exit_kd = exit_hint = torch.zeros((), device=logits.device)
        for exit_features, exit_logits in outs:
            exit_ce = exit_ce + labelled_cross_entropy(exit_logits, y)
            exit_kd = exit_kd + forward_kl(exit_logits, target, temperature=T) * (T * T)
            exit_hint = exit_hint + (exit_features.float() - features.float()).pow(2).mean()
        total = ce + (1 - a) * exit_ce + a * exit_kd + self.feature_weight * exit_hint
        n = len(outs)
        return {"loss": total, "ce": ce, "exit_ce": exit_ce / n, "exit_kd": exit_kd / n, "exit_hint": exit_hint / n}
