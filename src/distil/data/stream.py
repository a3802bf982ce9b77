"""A resumable stream of batches over an indexable dataset.

The order is a pure function of (seed, epoch): each epoch is a seeded permutation, so the stream's whole state is
(epoch, position) and a resumed run sees exactly the batches an uninterrupted run would. With several processes
(rank r of w), every global batch is split into w equal slices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class BatchStream:
    def __init__(
        self,
        size: int,
        batch_size: int,
        collate: Callable[[torch.Tensor], Any],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if size < batch_size * world_size:
            raise ValueError(f"dataset of {size} examples is smaller than one global batch ({batch_size * world_size})")
        self.size, self.batch_size, self.collate = size, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def next_indices(self) -> torch.Tensor:
        # Drop the incomplete tail of an epoch so every step sees a full batch (keeps accumulation exact).
        if self.position + self.global_batch > self.size:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        indices = self._order[start : start + self.batch_size]
        self.position += self.global_batch
        return indices

    def next(self) -> Any:
        return self.collate(self.next_indices())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(f"checkpoint's data stream (size {state['size']}, seed {state['seed']}) does not match")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
