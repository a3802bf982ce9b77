"""What every data source provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LoadedData:
    """What a task trains and evaluates on."""

    train: Any  # the training examples that `collate` indexes (tensors, texts)
    eval: Any  # the held-out split, in the form its task evaluates
    collate: Callable[[torch.Tensor], Any]  # indices into `train` -> one batch
    size: int  # how many training examples
    corpus: Any  # everything the source loaded (its task may read more of it: shapes, raw texts)


@dataclass(frozen=True)
class DataSource:
    problems: Callable[[Any], list[str]]  # data spec -> one line per problem, loading nothing
    load: Callable[..., LoadedData]  # (data spec, *, seed, tokenizer) -> LoadedData


@dataclass
class ClassificationData:
    """Train and test splits of a classification task: inputs as tensors (images [N, C, H, W], standardised; table
    rows [N, F]) or as lists of texts (or (text, text_pair) tuples); labels [N] int64, -1 where a row is unlabelled."""

    train_x: Any
    train_y: torch.Tensor
    test_x: Any
    test_y: torch.Tensor
    num_classes: int
    label_names: list[str] | None = None  # id -> label, saved with the student (id2label)
    pixel_stats: tuple[list[float], list[float]] | None = None  # images: the per-channel (mean, std) applied

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:]) if isinstance(self.train_x, torch.Tensor) else ()

    def rows(self, index: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The training batch at `index`: (inputs, labels)."""
        return take(self.train_x, index), self.train_y[index]


def take(inputs: Any, index: torch.Tensor) -> Any:
    """Rows of a tensor or a list at `index`."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return [inputs[i] for i in index.tolist()]
