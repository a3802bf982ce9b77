"""Guards against bad input that the tasks call before expensive work, and the one-line messages the CLI prints for
failures that cannot be known in advance (out of memory, operating-system errors).

Every guard raises (or returns) `DistilError`-style text: what is wrong, then how to fix it, on one line.
"""

from __future__ import annotations

import errno
import re
import sys
from typing import Any

from distil.errors import DistilError

# Where Hugging Face configs keep the number of positions a model was built for, by model family.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config: Any) -> tuple[int, str] | None:
    """(positions, attribute name) of a model config (a Hugging Face config or a dict); None when it has none."""
    for name in CONTEXT_ATTRIBUTES:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def sequence_length_problems(length: int, configs: dict[str, Any], *, key: str) -> list[str]:
    """One line per model (e.g. {"teacher": cfg, "student": cfg}) whose context is shorter than `length` tokens."""
    found = []
    for who, config in configs.items():
        context = context_length(config)
        if context is not None and length > context[0]:
            found.append(f"{key} ({length}) exceeds the {who}'s context of {context[0]} positions "
                         f"({context[1]} in its config); set {key}={context[0]} or less")
    return found


def check_sequence_length(length: int, configs: dict[str, Any], *, key: str) -> None:
    """Raise DistilError when a sequence of `length` tokens does not fit every model's context."""
    found = sequence_length_problems(length, configs, key=key)
    if found:
        raise DistilError(found[0])


def dataset_size_problems(examples: int, batch_size: int, *, what: str, key: str) -> list[str]:
    """An empty dataset, or one smaller than one batch (the loop drops incomplete batches, so it would never step)."""
    if examples <= 0:
        return [f"{what} is empty: no examples to train on; check the data source (data.path) and any filters"]
    if examples < batch_size:
        return [f"{key} ({batch_size}) exceeds the {examples} examples of {what}; lower {key} to {examples} or less"]
    return []


def out_of_memory_message(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is an out-of-memory error (torch's CPU or GPU allocator, Python's
    MemoryError), else None."""
    text = str(exc)
    torch = sys.modules.get("torch")
    gpu = torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ()))
    cpu = "can't allocate memory" in text or "not enough memory" in text or "DefaultCPUAllocator" in text
    if not (gpu or cpu or isinstance(exc, MemoryError)):
        return None
    size = ""
    match = re.search(r"[Tt]ried to allocate (\d+(?:\.\d+)?) ?([KMGT]i?B|bytes)", text)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        if unit == "bytes":
            amount, unit = amount / 2**30, "GiB"
        size = f", while allocating {amount:.3g} {unit}"
    where = "GPU memory" if gpu else "memory"
    return (f"out of {where}{size}; lower train.batch_size (raise train.grad_accum to keep the effective batch), "
            "use smaller models or train.precision=bf16; `distil estimate RECIPE` shows where the memory goes")


def os_error_message(exc: OSError) -> str:
    """One line for a failed file operation: which file, what the system said, and what to do for the usual ones."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    hints = {
        errno.ENOSPC: "free disk space or choose another output_dir=PATH (checkpoints are written whole or not at all)",
        errno.EACCES: "choose a folder you can write to (output_dir=PATH, $DISTIL_CACHE)",
        errno.EROFS: "choose a writable folder (output_dir=PATH, $DISTIL_CACHE)",
        errno.ENOENT: "check the path",
    }
    hint = hints.get(exc.errno or -1, "")
    return f"{where}{reason}" + (f"; {hint}" if hint else "")
