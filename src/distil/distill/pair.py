"""The teacher side of a distillation pair: frozen, always in eval mode, never building a graph."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distil.errors import DistilError


class Teacher(nn.Module):
    """Wrap a model as a frozen teacher.

    Its parameters never require grad, it stays in eval mode even when `.train()` is called on it or on a module
    that contains it (dropout and batch-norm statistics stay fixed), and its forward runs under `torch.no_grad()`.
    (`no_grad`, not `inference_mode`: inference tensors cannot take part in the student's backward pass.)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for param in model.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.model.training:  # someone called .train() on the inner model directly
            self.model.eval()
        with torch.no_grad():
            return self.model(*args, **kwargs)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DistilError(f"cannot find logits in a model output of type {type(output).__name__}")


def _where(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def check_pair(student: nn.Module, teacher: nn.Module, example: tuple[Any, ...]) -> None:
    """Pre-flight check of a classifier pair: same device, same output width; one clear error otherwise."""
    s_device, s_dtype = _where(student)
    t_device, t_dtype = _where(teacher)
    if s_device != t_device:
        raise DistilError(f"student is on {s_device} but teacher is on {t_device}; move both to one device")
    was_training = student.training
    student.eval()
    with torch.no_grad():
        s_out = _first_tensor(student(*example))
        t_out = _first_tensor(teacher(*example))
    student.train(was_training)
    if s_out.shape[-1] != t_out.shape[-1]:
        raise DistilError(
            f"student predicts {s_out.shape[-1]} classes but teacher predicts {t_out.shape[-1]}; "
            "the output layers must have the same number of classes"
        )
    if not (s_out.dtype.is_floating_point and t_out.dtype.is_floating_point):
        raise DistilError(f"logits must be floating point (student {s_out.dtype}, teacher {t_out.dtype})")
    del s_dtype, t_dtype  # differing dtypes are fine: losses upcast to fp32
