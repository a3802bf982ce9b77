"""Evaluating classifiers."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 1000) -> float:
    """Share of `x` that `model` labels as `y`, in batches of `batch` on `device`."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch].to(device)).argmax(-1).cpu() == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / len(y)
