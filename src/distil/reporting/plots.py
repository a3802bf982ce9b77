"""The report's plots, drawn on matplotlib's Agg canvas (no display, no pyplot global state) and saved as PNG."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from distil.train.metrics import TIMING_KEYS

ARM_COLORS = {"teacher": "#6b6b6b", "student_alone": "#e08a2c", "distilled": "#2b6cb0"}
OTHER_COLORS = ["#2f9e44", "#ae3ec9", "#c92a2a", "#1098ad", "#5c940d", "#d6336c"]
THROUGHPUT_KEY = re.compile(r"^(samples|tokens)_per_s_b(\d+)$")
# Quantities where smaller is better; everything else shown is better when larger.
LOWER_IS_BETTER = {"perplexity", "loss", "params", "size_bytes", "latency_ms", "peak_memory_bytes"}


def arm_color(arm: str, order: list[str]) -> str:
    """The arm's own color everywhere; export variants ('distilled ONNX int8') get a runtime color of their own."""
    if arm in ARM_COLORS:
        return ARM_COLORS[arm]
    if "int8" in arm:
        return "#2f9e44"
    if "ONNX" in arm:
        return "#74a9e0"
    if arm.split(" ")[0] in ARM_COLORS:
        return ARM_COLORS[arm.split(" ")[0]]
    others = [a for a in order if a not in ARM_COLORS]
    return OTHER_COLORS[others.index(arm) % len(OTHER_COLORS)] if arm in others else OTHER_COLORS[0]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" text chunk: the PNG then carries no URL of its own.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _grid(n: int, ncols: int, width: float = 4.0, height: float = 3.0) -> tuple[Figure, list[Any]]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


# ------------------------------------------------------------------------------------------------- training curves
def curve_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every logged quantity worth a curve: the total loss, each loss term, lr, grad norm, others, then evaluations.

    Throughput and timings are left out: they measure the machine, not the training.
    """
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key in ("arm", "step") or key in TIMING_KEYS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                seen.setdefault(key)

    def rank(key: str) -> tuple[int, str]:
        if key == "loss":
            return (0, key)
        if key.startswith("loss/"):
            return (1, key)
        if key in ("lr", "grad_norm"):
            return (2 if key == "lr" else 3, key)
        if key.startswith("eval/"):
            return (5, key)
        return (4, key)

    return sorted(seen, key=rank)


def training_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per logged quantity, one line per arm, over optimizer steps. None when nothing was logged."""
    keys = curve_keys(records)
    if not keys:
        return None
    arms = list(dict.fromkeys(str(r.get("arm", "run")) for r in records))
    fig, axes = _grid(len(keys), ncols=3)
    for ax, key in zip(axes, keys):
        for arm in arms:
            points = sorted((r["step"], r[key]) for r in records
                            if str(r.get("arm", "run")) == arm and isinstance(r.get(key), (int, float)) and "step" in r)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, label=arm, color=arm_color(arm, arms),
                    marker="o" if len(points) <= 12 else None, markersize=4)
        positive = [r[key] for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if key.startswith("loss") and positive and len(positive) == sum(
                isinstance(r.get(key), (int, float)) for r in records) and max(positive) / min(positive) > 50:
            ax.set_yscale("log")  # losses fall over decades; a linear axis hides everything after the first steps
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------- comparisons
def human(value: float, key: str) -> str:
    """A short label for a measured value: bytes in KB/MB/GB, counts in K/M/B, others to 3-4 significant digits."""
    if key in ("size_bytes", "peak_memory_bytes"):
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if abs(value) < 1024 or unit == "TB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    if key == "params":
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.2f}{unit}"
        return f"{value:.0f}"
    if key in ("accuracy", "agreement"):
        return f"{value:.2%}" if value <= 1 else f"{value:.4g}"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def axis_unit(key: str, values: list[float]) -> tuple[float, str]:
    """A scale that keeps an axis's tick labels short: bytes in KB/MB/GB, counts in thousands or millions."""
    top = max((abs(v) for v in values), default=0.0)
    if key in ("size_bytes", "peak_memory_bytes"):
        for scale, unit in ((1024**3, "GB"), (1024**2, "MB"), (1024, "KB")):
            if top >= scale:
                return float(scale), unit
        return 1.0, "bytes"
    if key == "params" or THROUGHPUT_KEY.match(key):
        for scale, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
            if top >= scale:
                return scale, unit
    return 1.0, ""


def ratio(x: float) -> str:
    """A ratio to the reference, e.g. '0.17×' or '5.7×'."""
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:.3g}×" if x >= 1 else f"{x:.2g}×"


def quantity_title(key: str, extra: dict[str, Any] | None = None) -> str:
    titles = {"params": "parameters", "size_bytes": "size on disk", "latency_ms": "latency, batch 1 (ms)",
              "peak_memory_bytes": "peak inference memory", "agreement": "top-1 agreement with teacher"}
    match = THROUGHPUT_KEY.match(key)
    if match:
        title = f"throughput, batch {match.group(2)} ({match.group(1)}/s)"
    else:
        title = titles.get(key, key)
    if key == "peak_memory_bytes" and extra and extra.get("peak_memory_batch"):
        title += f", batch {extra['peak_memory_batch']}"
    better = "lower" if key in LOWER_IS_BETTER else "higher"
    return f"{title}\n({better} is better)"


def comparison_keys(summary: dict[str, Any]) -> list[str]:
    """Quality metrics first, then size, speed and memory: the quantities a teacher-vs-student chart shows."""
    arms = summary.get("arms", {})
    present = {k for values in arms.values() for k, v in values.items() if isinstance(v, (int, float))}
    keys = [m for m in summary.get("metrics", []) if m in present]
    keys += [k for k in ("params", "size_bytes") if k in present]
    # An LM's batch-1 generation speed says what its per-token latency would; show one of the two.
    keys += ["latency_ms"] if "latency_ms" in present and "tokens_per_s_b1" not in present else []
    keys += sorted((k for k in present if THROUGHPUT_KEY.match(k)), key=lambda k: int(THROUGHPUT_KEY.match(k)[2]))
    keys += [k for k in ("peak_memory_bytes",) if k in present]
    return keys


def bar_chart(rows: dict[str, dict[str, Any]], keys: list[str], path: Path, *, title: str, reference: str) -> Path | None:
    """One panel per quantity, one bar per row, each bar labelled with its value and its ratio to `reference`."""
    if not keys or not rows:
        return None
    names = list(rows)
    crowded = len(names) > 3  # wider panels, three to a row, so that the bars' labels stay apart
    fig, axes = _grid(len(keys), ncols=3 if crowded else 4, width=1.2 * len(names) if crowded else 3.6, height=3.2)
    first = next(iter(rows.values()))
    for ax, key in zip(axes, keys):
        values = [rows[n].get(key) for n in names]
        scale, unit = axis_unit(key, [v for v in values if isinstance(v, (int, float))])
        heights = [v / scale if isinstance(v, (int, float)) else 0.0 for v in values]
        bars = ax.bar(range(len(names)), heights, color=[arm_color(n, names) for n in names])
        ref = rows.get(reference, {}).get(key)
        top = max(heights) if heights and max(heights) > 0 else 1.0
        known = [h for h, v in zip(heights, values) if isinstance(v, (int, float)) and h > 0]
        # Perplexity is exp(loss): an untrained student can sit orders of magnitude above the rest.
        log = key == "perplexity" and bool(known) and max(known) / min(known) > 30
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(known) / 2, top * 8)
        else:
            ax.set_ylim(0, top * 1.35)
        for name, bar, value in zip(names, bars, values):
            if not isinstance(value, (int, float)):
                label = "n/a"
            elif name == reference:
                label = f"{human(value, key)}\n(reference)"
            elif isinstance(ref, (int, float)) and ref > 0:
                label = f"{human(value, key)}\n{ratio(value / ref)} {reference.split(' ')[0]}"
            else:
                label = human(value, key)
            y = bar.get_height() * 1.15 if log else bar.get_height() + top * 0.02
            ax.text(bar.get_x() + bar.get_width() / 2, y, label, ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_title(quantity_title(key, first), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.6g}"))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def comparison(summary: dict[str, Any], path: Path) -> Path | None:
    """Teacher vs students: quality, parameters, size, latency, throughput and memory, with ratios to the teacher."""
    arms = summary.get("arms", {})
    reference = "teacher" if "teacher" in arms else next(iter(arms), "")
    return bar_chart(arms, comparison_keys(summary), path, title="Teacher vs students", reference=reference)


def export_chart(record: dict[str, Any], path: Path) -> Path | None:
    """The exported student beside the PyTorch teacher and student, measured on the same inputs and threads."""
    rows: dict[str, dict[str, Any]] = record.get("measurements", {})
    if not rows:
        return None
    present = {k for values in rows.values() for k, v in values.items() if isinstance(v, (int, float))}
    keys = [k for k in [record.get("metric"), "agreement", "size_bytes", "latency_ms"] if k and k in present]
    keys += sorted((k for k in present if THROUGHPUT_KEY.match(k)), key=lambda k: int(THROUGHPUT_KEY.match(k)[2]))
    reference = "teacher (PyTorch)" if "teacher (PyTorch)" in rows else next(iter(rows))
    return bar_chart(rows, keys, path, title=f"Export of {record.get('arm', 'student')}: {record.get('format')}",
                     reference=reference)
