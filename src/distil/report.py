"""Measuring the arms of a run (size, latency) and writing `summary.json` plus the end-of-run table."""

from __future__ import annotations

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


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size(path: Path) -> int:
    """Bytes on disk of a model file or folder (weights and config)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_latency(forward: Callable[[], Any], runs: int = 30, warmup: int = 3) -> float:
    """Median wall-clock milliseconds of `forward()` over `runs` calls, after `warmup` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            forward()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    summary = {**summary, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    summary.setdefault("versions", library_versions())
    write_json(Path(run_dir) / "summary.json", summary)
    return summary


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


# Optional per-arm measurements shown when present: (key, column title).
_SPEED_COLUMNS = (("tokens_per_s_b1", "tok/s b1"), ("tokens_per_s_b8", "tok/s b8"))


def summary_table(summary: dict[str, Any]) -> Table:
    """One row per arm: its quality metrics, parameters, size on disk and speed."""
    arms: dict[str, dict[str, Any]] = summary["arms"]
    metrics = summary.get("metrics") or []
    speeds = [(k, title) for k, title in _SPEED_COLUMNS if any(k in v for v in arms.values())]
    table = Table(title=f"{summary.get('recipe', 'run')}: teacher vs students")
    table.add_column("arm", style="bold", no_wrap=True)
    for name in metrics:
        table.add_column(name, justify="right")
    table.add_column("params", justify="right")
    table.add_column("size", justify="right")
    if speeds:
        for _, title in speeds:
            table.add_column(title, justify="right")
    else:
        table.add_column("latency ms (b=1)", justify="right")
    for arm, values in arms.items():
        row = [arm] + [_fmt(values.get(m)) for m in metrics]
        size = values.get("size_bytes")
        row += [_fmt(values.get("params")), _fmt_bytes(size) if size else "-"]
        row += [_fmt(values.get(k)) for k, _ in speeds] if speeds else [_fmt(values.get("latency_ms"))]
        table.add_row(*row)
    return table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(summary))
