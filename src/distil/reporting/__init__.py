"""The run report: `build_report(run_dir)` writes `report.html` (self-contained) and its plots as PNG files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distil.errors import DistilError

REPORT_FILE = "report.html"
PLOTS_DIR = "report"
EXPORT_FILE = "export.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_exports(run_dir: Path) -> list[dict[str, Any]]:
    """The export records of a run (`export.json`, written by `distil export`), oldest first."""
    path = Path(run_dir) / EXPORT_FILE
    return list(json.loads(path.read_text()).get("exports", [])) if path.is_file() else []


def build_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` and the plots beside it in `run_dir/report/`; return the HTML file's path."""
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise DistilError(f"{run_dir} has no summary.json (the run has not finished); "
                          f"finish it with `distil resume {run_dir}`, then `distil report {run_dir}`")
    try:
        from distil.reporting import html, plots  # matplotlib: imported only when a report is drawn
    except ImportError as exc:
        raise DistilError(f"the run report needs matplotlib ({exc}); install it with pip install 'distil[report]', "
                          f"then run `distil report {run_dir}`") from exc
    summary = json.loads(summary_file.read_text())
    out = run_dir / PLOTS_DIR
    curves = plots.training_curves(_read_jsonl(run_dir / "metrics.jsonl"), out / "training_curves.png")
    compare = plots.comparison(summary, out / "comparison.png")
    exports = []
    for record in read_exports(run_dir):
        name = f"export_{record.get('arm', 'student')}_{record.get('format', 'model')}.png"
        exports.append((record, plots.export_chart(record, out / name)))
    recipe_file = run_dir / "recipe.yaml"
    recipe_text = recipe_file.read_text() if recipe_file.is_file() else "(no recipe.yaml in the run directory)"
    page = html.render(summary, curves=curves, compare=compare, recipe_text=recipe_text, exports=exports)
    target = run_dir / REPORT_FILE
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process killed before its rename
        stale.unlink(missing_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


__all__ = ["build_report", "read_exports", "REPORT_FILE", "PLOTS_DIR", "EXPORT_FILE"]
