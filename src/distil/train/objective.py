"""What the training loop trains: an objective turns a batch into named loss terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Objective:
    """Subclasses set `modules` (trained and checkpointed: the student, projectors, ...) and `unit`, and define
    `loss` and `weight`. `prepare` and `teachers` are optional: by default a batch is used as it comes and the
    objective reads no frozen model."""

    modules: dict[str, nn.Module]
    unit: str = "samples"  # what `weight` counts: "samples" or "tokens"

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """Named terms of one micro-batch; 'loss' is the total to minimise (a mean over the batch's units)."""
        raise NotImplementedError

    def weight(self, batch: Any) -> int:
        """How many units (examples, tokens) the batch's mean runs over: micro-batches are weighted by it."""
        raise NotImplementedError

    def prepare(self, batches: list[Any], step: int) -> list[Any]:
        """Called once per optimizer step (`step` counts from 0) on its fresh micro-batches, before they are weighed:
        e.g. to replace them by on-policy samples, or to update an EMA teacher. Any randomness must come from torch's
        global RNG, which checkpoints restore."""
        return batches

    def teachers(self) -> dict[str, nn.Module]:
        """The frozen models `loss` reads, by name: placed (or sharded under torchrun) by the loop."""
        return {}


def teacher_models(**teachers: Any) -> dict[str, nn.Module]:
    """name -> model of the teachers given (a distil Teacher wraps its model; None is left out)."""
    return {name: getattr(t, "model", t) for name, t in teachers.items() if t is not None}
