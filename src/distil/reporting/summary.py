"""`summary.json` and the end-of-run table: one row per arm."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distil.paths import library_versions
from distil.train.checkpoint import write_json

_THROUGHPUT = re.compile(r"^(samples|tokens)_per_s_b(\d+)$")


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
    # Generation speed at batch 1 already says what a batch-1 latency would (the causal_lm task derives one from it).
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
