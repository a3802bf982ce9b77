"""What ``distil cache info PATH`` shows: size, bytes per token, teacher, coverage and settings of a cache.

Works on complete caches and on builds in progress or interrupted (coverage then says how far they got).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from distil.cache import format as fmt
from distil.errors import DistilError


def _records(root: Path) -> list[fmt.ShardRecord]:
    records = []
    for path in sorted(root.glob("shard-*.json")):
        try:
            record = fmt.read_model(path, fmt.ShardRecord)
        except DistilError:
            continue  # an unreadable record counts as not done, as for the build
        shard = root / record.file
        if shard.exists() and shard.stat().st_size == record.bytes:
            records.append(record)
    return records


def cache_info(path: str | Path) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the cache at ``path``."""
    root = Path(path)
    if not (root / fmt.BUILD).exists():
        raise DistilError(f"{root} is not a teacher cache (no {fmt.BUILD})")
    settings = fmt.read_model(root / fmt.BUILD, fmt.BuildSettings)
    stream = fmt.read_model(root / fmt.STREAM, fmt.StreamInfo) if (root / fmt.STREAM).exists() else None
    complete = (root / fmt.MANIFEST).exists()
    records = _records(root)
    files = [p for p in root.iterdir() if p.is_file()]
    shard_bytes = sum(r.bytes for r in records)
    positions = sum(r.num_positions for r in records)
    vocab = records[0].vocab_size if records else None
    f = settings.fields
    return {
        "path": str(root),
        "complete": complete,
        "size_bytes": sum(p.stat().st_size for p in files),
        "shard_bytes": shard_bytes,
        "bytes_per_token": shard_bytes / positions if positions else None,
        "teacher": {"name": f.teacher, "weights_hash": f.teacher_hash, "tokenizer_hash": f.tokenizer_hash},
        "dataset_fingerprint": stream.dataset_fingerprint if stream else f.dataset_fingerprint,
        "coverage": {
            "shards_done": len(records),
            "shards_expected": stream.num_shards if stream else None,
            "samples_done": sum(r.num_samples for r in records),
            "samples_expected": stream.num_samples if stream else None,
            "tokens_done": positions,
            "tokens_expected": stream.num_positions if stream else None,
        },
        "settings": {
            "mode": settings.mode,
            "k": settings.k,
            "num_draws": settings.num_draws,
            "sampling": settings.sampling,
            "temperature": settings.temperature,
            "seed": settings.seed,
            "shard_size": settings.shard_size,
            "seq_len": f.seq_len,
            "vocab_size": vocab,
            "layout": records[0].layout if records else None,
            "dtypes": fmt.storage_dtypes(settings.mode, vocab, settings.num_draws) if vocab else None,
        },
        "notes": dict(f.notes),
        "temporary_files": sum(".tmp-" in p.name for p in files),
        "tail_mass": _tail_mass(root, records) if settings.mode == "topk" else None,
    }


def _tail_mass(root: Path, records: list[fmt.ShardRecord]) -> dict[str, float] | None:
    """Mean and median of the teacher's probability outside the stored top k, over every cached position: how much of
    the teacher's distribution a top-k cache keeps as one bucket (its shape is lost)."""
    from safetensors import safe_open

    tails = []
    for r in records:  # only the tails are read: `cache info` stays quick on a cache of many GB
        with safe_open(str(root / r.file), framework="numpy") as shard:
            tails.append(shard.get_tensor("tail_logmass").astype(np.float64))
    if not tails or not sum(len(t) for t in tails):
        return None
    mass = np.exp(np.concatenate(tails))
    return {"mean": float(mass.mean()), "median": float(np.median(mass))}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _of(done: int, expected: int | None) -> str:
    return f"{done:,} of {expected:,}" if expected is not None else f"{done:,} of (unknown until a part ends)"


def render_cache_info(info: dict[str, Any]) -> Table:
    """A rich table of ``cache_info``'s dict, for the CLI to print."""
    t = Table(title=f"teacher cache {info['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    cov, s, teacher = info["coverage"], info["settings"], info["teacher"]
    t.add_row("status", "complete" if info["complete"] else "[yellow]incomplete[/yellow] (resume the build)")
    t.add_row("size on disk", _size(info["size_bytes"]))
    bpt = info["bytes_per_token"]
    t.add_row("bytes per token", f"{bpt:,.1f}" if bpt is not None else "-")
    t.add_row("teacher", teacher["name"] or "-")
    t.add_row("teacher weights hash", (teacher["weights_hash"] or "-")[:16])
    t.add_row("tokenizer hash", (teacher["tokenizer_hash"] or "-")[:16])
    t.add_row("dataset fingerprint", (info["dataset_fingerprint"] or "-")[:16])
    t.add_row("samples", _of(cov["samples_done"], cov["samples_expected"]))
    t.add_row("tokens", _of(cov["tokens_done"], cov["tokens_expected"]))
    t.add_row("shards", _of(cov["shards_done"], cov["shards_expected"]))
    size = f"k={s['k']}" if s["mode"] == "topk" else f"{s['num_draws']} {s['sampling']} draws" if s["mode"] == "sample" else "all"
    t.add_row("targets", f"{s['mode']} ({size}), temperature {s['temperature']:g}")
    t.add_row("vocabulary", f"{s['vocab_size']:,}" if s["vocab_size"] else "-")
    t.add_row("seq_len", str(s["seq_len"] or "-"))
    if s["dtypes"]:
        shown = {k: v for k, v in s["dtypes"].items() if k not in ("sample_ids", "lengths", "keep")}
        t.add_row("dtypes", ", ".join(f"{k}={v}" for k, v in shown.items()))
    tail = info.get("tail_mass")
    if tail is not None:
        advice = ("; much of it: a top-k cache keeps only its total, a sampled cache (mode: sample) keeps its shape "
                  "in expectation" if tail["mean"] >= 0.1 else "")
        t.add_row("teacher mass outside top k", f"mean {tail['mean']:.1%}, median {tail['median']:.1%}{advice}")
    if info["temporary_files"]:
        t.add_row("temporary files", f"{info['temporary_files']} left by interrupted writes (safe to delete)")
    return t
