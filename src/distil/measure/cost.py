"""What a model costs: parameters, bytes on disk, latency, throughput and peak inference memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn



def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size(path: str | Path) -> int:
    """Bytes on disk of a model file or folder (weights and config, recursively)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _sync() -> None:
    # CUDA kernels run asynchronously: wait for them, or a timer measures only the launch.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_latency(forward: Callable[[], Any], runs: int = 30, warmup: int = 3) -> float:
    """Median wall-clock milliseconds of `forward()` over `runs` calls, after `warmup` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        times = []
        for _ in range(runs):
            _sync()
            start = time.perf_counter()
            forward()
            _sync()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_throughput(forward: Callable[[], Any], items: int, runs: int = 10, warmup: int = 2) -> float:
    """Items (samples or tokens) per second that `forward()` processes, `items` per call, from its median latency."""
    return items / (measure_latency(forward, runs=runs, warmup=warmup) / 1000)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers: what stays resident while it serves."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    # Return freed heap pages to the OS, so that memory freed earlier is not silently reused (and missed) below.
    # (No gc.collect(): garbage still held is resident before the call too, and a collection takes seconds in a
    # process holding transformers' many objects.)
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_forward_memory(forward: Callable[[], Any], device: torch.device | str, repeats: int = 3) -> int | None:
    """Peak bytes that one `forward()` call needs beyond what is resident before it (activations, workspaces).

    CUDA: `torch.cuda.max_memory_allocated` over the call, less what was allocated before it.
    CPU: the growth of the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the
    call, after freed heap pages are returned to the OS (malloc_trim). It counts every allocation (torch's,
    oneDNN's, Python's), which tracemalloc cannot see; it works in-process on Linux, and gives None elsewhere.
    The median of `repeats` calls, after one untimed call that absorbs one-time costs (kernel selection, lazy
    initialisation). In a long-lived process whose heap is fragmented, glibc may serve a large buffer from a freed
    heap chunk that stays resident after the call, so the CPU figure can exceed a fresh process's by such chunks.
    """
    device = torch.device(device)
    with torch.inference_mode():
        forward()
        peaks = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                forward()
                torch.cuda.synchronize(device)
                peaks.append(torch.cuda.max_memory_allocated(device) - before)
            else:
                _trim_heap()
                if not _reset_peak_rss():
                    return None
                before = _proc_status_bytes("VmRSS")
                forward()
                peaks.append(max(0, _proc_status_bytes("VmHWM") - before))
    return int(statistics.median(peaks))


def measure_peak_memory(model: nn.Module, forward: Callable[[], Any], device: torch.device | str) -> int | None:
    """Peak inference memory in bytes: the model's weights and buffers plus the peak a forward pass adds."""
    extra = peak_forward_memory(forward, device)
    return None if extra is None else tensor_bytes(model) + extra
