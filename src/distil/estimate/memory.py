"""The parts of a memory estimate (items, stages) and the tools that size them without allocating: parameter bytes,
tensors saved for backward traced on the meta device, optimizer state, the machine's available memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distil.config.schema import TrainSpec
from distil.errors import DistilError


class EstimateUnavailable(DistilError):
    """The estimate cannot be made yet (not an error in the recipe)."""


@dataclass
class MemoryItem:
    name: str
    bytes: int
    detail: str = ""
    host: bool = False  # held in host RAM even when the models train on a GPU (datasets, checkpoint staging)


@dataclass
class StageEstimate:
    name: str
    items: list[MemoryItem] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    def on(self, host: bool) -> int:
        return sum(item.bytes for item in self.items if item.host == host)


@dataclass
class MemoryEstimate:
    device: str  # "cpu" or "cuda": on cpu, host and device memory are the same RAM
    stages: list[StageEstimate]

    @property
    def peak(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        return self.peak.total

    def format(self, prefix: str = "") -> str:
        peak = self.peak
        where = "RAM" if self.device == "cpu" else f"{human(peak.on(False))} GPU + {human(peak.on(True))} host RAM"
        lines = [f"memory estimate: {human(peak.total)} at peak, during '{peak.name}' ({where})"]
        width = max(len(item.name) for item in peak.items)
        for item in peak.items:
            detail = f"  ({item.detail})" if item.detail else ""
            lines.append(f"  {item.name:<{width}}  {human(item.bytes):>9}{detail}")
        others = [f"{s.name} {human(s.total)}" for s in self.stages if s is not peak]
        if others:
            lines.append(f"  other stages: {', '.join(others)}")
        lines.append("  (tensors only; the interpreter and torch add a few hundred MB)")
        return "\n".join(prefix + line for line in lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}" if n < 1e6 else f"{n:.2g} {unit}"
        n /= 1024
    return f"{n} B"


# ------------------------------------------------------------------------------------------------ measuring tools
def parameter_bytes(model: nn.Module, *, trainable: bool | None = None) -> int:
    """Bytes of the parameters and buffers (trainable=None), or of the (non-)trainable parameters only."""
    if trainable is None:
        tensors = [*model.parameters(), *model.buffers()]
    else:
        tensors = [p for p in model.parameters() if p.requires_grad == trainable]
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_tensor_bytes(fn: Callable[[], object], exclude: list[torch.Tensor] | tuple = ()) -> int:
    """Bytes autograd keeps for the backward pass while `fn()` runs (run it on the meta device: nothing is
    allocated). Tensors sharing a storage count once; `exclude` (the parameters) counts zero."""
    return trace_saved(fn, exclude)[0]


def trace_saved(fn: Callable[[], object], exclude: list[torch.Tensor] | tuple = ()) -> tuple[int, int]:
    """(total, largest) bytes of the storages autograd saves for backward while `fn()` runs; see saved_tensor_bytes."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # hold every saved tensor so no storage id is reused while tracing

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            storages[storage._cdata] = max(storages.get(storage._cdata, 0), t.numel() * t.element_size())
        keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), max(storages.values(), default=0)


def largest_inference_pair(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the largest input + output of one leaf module in an inference forward pass: the transient peak of
    evaluation, when activations are freed as soon as the next layer has consumed them."""
    peak = [example.numel() * example.element_size()]

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if isinstance(output, torch.Tensor):
            tensors.append(output)
        peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return peak[0]


def optimizer_bytes(spec: TrainSpec, trainable: int) -> tuple[int, str]:
    if spec.optimizer == "adamw":
        return 2 * trainable, "adamw: exp_avg + exp_avg_sq"
    if spec.momentum > 0:
        return trainable, "sgd: momentum buffer"
    return 0, "sgd without momentum"


def optimizer_step_bytes(spec: TrainSpec, trainable: int, largest: int, cuda: bool) -> int:
    """Temporaries of one optimizer step. distil's AdamW uses torch's fused kernel (distil.train.optim), which
    updates in place and needs no per-parameter temporaries; SGD computes grad + weight_decay * param."""
    if spec.optimizer == "adamw":
        return 0
    return largest if spec.weight_decay > 0 else 0

def available_memory() -> int | None:
    """Bytes of RAM this process may use: physical memory plus swap, capped by a cgroup limit; None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def first_line(exc: Exception) -> str:
    text = str(exc)
    return "a size does not fit in 64 bits" if "Overflow" in text else (text.splitlines() or [type(exc).__name__])[0]
