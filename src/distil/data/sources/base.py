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
