"""Measurements that are the same every run, kept in the cache: a teacher's held-out scores, speed and samples.

A run's teacher is usually the same model on the same held-out data as the run before it; measuring it again (its
perplexity, generation speed, peak memory and greedy samples) costs a large part of a short run's evaluation. The
result is stored under `$DISTIL_CACHE/measurements/`, keyed by everything it depends on: the model's files (names,
sizes, modification times), its dtype, the exact held-out tokens and prompts, the settings of the measurement, the
device, the thread count and the library versions. Any change measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distil.paths import cache_dir, library_versions

Measurement = tuple[dict[str, Any], torch.Tensor, list[str]]  # (summary row, top-1 predictions, greedy samples)


def model_files_key(folder: Path) -> list[tuple[str, int, int]]:
    """What identifies a model folder's contents cheaply: each file's name, size and modification time."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())


def tensor_key(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()


# Bumped whenever what a measurement holds changes, so that entries written by an older distil are measured again:
# 2 = predictions at the scored positions only, flat (1: [blocks, seq_len - 1]).
FORMAT = 2


def remembered(what: dict[str, Any], measure: Callable[[], Measurement]) -> Measurement:
    """`measure()`'s result for `what` (JSON-able), from the cache when an earlier run measured exactly that."""
    what = {**what, "threads": torch.get_num_threads(), "versions": library_versions(), "format": FORMAT}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]
    folder = cache_dir() / "measurements"
    row_file, tensors_file = folder / f"{key}.json", folder / f"{key}.safetensors"
    try:
        saved = json.loads(row_file.read_text())
        return {**saved["row"], "measured": saved["measured"]}, load_file(tensors_file)["predictions"], saved["samples"]
    except (OSError, ValueError, KeyError, SafetensorError):
        pass  # not measured yet, or an unreadable entry: measure again
    row, predictions, samples = measure()
    from datetime import datetime, timezone

    measured = f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} (reused by later runs)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, write in ((tensors_file, lambda p: save_file({"predictions": predictions.contiguous()}, p)),
                            (row_file, lambda p: Path(p).write_text(json.dumps(
                                {"what": what, "row": row, "samples": samples, "measured": measured}, default=str)))):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            write(str(tmp))
            os.replace(tmp, path)  # the JSON goes last: an entry without its tensors is never read
    except OSError:
        pass  # a read-only or full cache only costs the next run a measurement
    return row, predictions, samples
