"""Evaluating classifiers: accuracy, macro-F1 and the confusion matrix on a held-out split."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distil.data.sources.base import take


@torch.inference_mode()
def predictions(model: nn.Module, x: Any, device: torch.device, batch: int = 1000) -> torch.Tensor:
    """The labels `model` predicts for `x` (a tensor, or a list of texts), in batches of `batch` on `device`."""
    was_training = model.training
    model.eval()
    found = []
    for i in range(0, len(x), batch):
        rows = take(x, torch.arange(i, min(i + batch, len(x))))
        found.append(model(rows.to(device) if isinstance(rows, torch.Tensor) else rows).argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(found)


def accuracy(model: nn.Module, x: Any, y: torch.Tensor, device: torch.device, batch: int = 1000) -> float:
    """Share of `x` that `model` labels as `y`."""
    return int((predictions(model, x, device, batch) == y).sum()) / len(y)


def confusion_matrix(predicted: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] counts."""
    return torch.bincount(y * num_classes + predicted, minlength=num_classes * num_classes).view(num_classes,
                                                                                                 num_classes)


def macro_f1(confusion: torch.Tensor) -> float:
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class absent from both truth and predictions is
    left out (its F1 is undefined)."""
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    present = (tp + fp + fn) > 0
    return float((2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])).mean())


def classification_scores(model: nn.Module, x: Any, y: torch.Tensor, device: torch.device, num_classes: int,
                          batch: int = 1000) -> dict[str, Any]:
    predicted = predictions(model, x, device, batch)
    confusion = confusion_matrix(predicted, y, num_classes)
    return {"accuracy": int((predicted == y).sum()) / len(y), "macro_f1": macro_f1(confusion),
            "confusion": confusion.tolist()}
