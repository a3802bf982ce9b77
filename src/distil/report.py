"""Measuring the arms of a run (size, latency) and writing `summary.json` plus the end-of-run table."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from distil.paths import library_versions
from distil.train.checkpoint import write_json


_THROUGHPUT = re.compile(r"^(samples|tokens)_per_s_b(\d+)$")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size(path: Path) -> int:
    """Bytes on disk of a model file or folder (weights and config)."""
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


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    summary = {**summary, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    summary.setdefault("versions", library_versions())
    write_json(Path(run_dir) / "summary.json", summary)
    return summary


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:.1e}".replace("e+0", "e").replace("e+", "e")
        return f"{value:,.0f}" if abs(value) >= 1e3 else f"{value:.3f}" if abs(value) < 1 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


# Short column titles, so the table fits an 80-column terminal.
_SHORT = {"perplexity": "ppl", "agreement": "agree", "response_perplexity": "resp ppl", "accuracy": "acc"}


def _fmt_count(n: Any) -> str:
    if not isinstance(n, int):
        return _fmt(n)
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,}"


def summary_table(summary: dict[str, Any]) -> Table:
    """One row per arm: its quality metrics, parameters, size on disk, speed and peak memory."""
    arms: dict[str, dict[str, Any]] = summary["arms"]
    metrics = summary.get("metrics") or []
    present = {k for values in arms.values() for k, v in values.items() if v is not None}
    speeds = sorted((k for k in present if _THROUGHPUT.match(k)), key=lambda k: int(_THROUGHPUT.match(k)[2]))
    # Generation speed at batch 1 already says what a batch-1 latency would (the LM pipeline derives one from it).
    latency = "latency_ms" in present and "tokens_per_s_b1" not in present
    table = Table(title=f"{summary.get('recipe', 'run')}: teacher vs students", padding=(0, 1))
    table.add_column("arm", style="bold", no_wrap=True)
    for name in metrics:
        table.add_column(_SHORT.get(name, name), justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    if latency:
        table.add_column("latency ms (b=1)", justify="right")
    for key in speeds:
        match = _THROUGHPUT.match(key)
        table.add_column(f"{'tok' if match[1] == 'tokens' else match[1]}/s@{match[2]}", justify="right",
                         no_wrap=True)
    if "peak_memory_bytes" in present:
        table.add_column("peak", justify="right", no_wrap=True)
    for arm, values in arms.items():
        row = [arm] + [_fmt(values.get(m)) for m in metrics]
        size = values.get("size_bytes")
        row += [_fmt_count(values.get("params")), _fmt_bytes(size) if size else "-"]
        row += [_fmt(values.get("latency_ms"))] if latency else []
        row += [_fmt(values.get(k)) for k in speeds]
        if "peak_memory_bytes" in present:
            peak = values.get("peak_memory_bytes")
            row.append(_fmt_bytes(peak) if peak else "-")
        table.add_row(*row)
    return table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(summary))
