"""The report page: one self-contained HTML file (inline CSS, plots as base64 data URIs, no script, no URL)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from distil.reporting.plots import comparison_keys, human, quantity_title, ratio

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1f2328; }
h1 { margin-bottom: 0.2rem; } .sub { color: #59636e; margin-top: 0; }
section { margin: 2rem 0; } h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: 0.3rem; }
img { max-width: 100%; border: 1px solid #d1d9e0; border-radius: 6px; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d1d9e0; padding: 0.35rem 0.6rem; text-align: right; vertical-align: top; }
th { background: #f6f8fa; } td.text, th.text { text-align: left; white-space: pre-wrap; max-width: 28rem; }
td .ratio { color: #59636e; font-size: 0.8rem; display: block; }
pre { background: #f6f8fa; padding: 1rem; border-radius: 6px; overflow-x: auto; font-size: 0.85rem; }
.gen { max-height: 14em; overflow-y: auto; }
.ok { color: #1a7f37; } .bad { color: #cf222e; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def image(path: Path | None, alt: str) -> str:
    if path is None:
        return f"<p>No data for: {esc(alt)}.</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _cell(value: Any, key: str, ref: Any = None, ref_name: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{esc('-' if value is None else value)}</td>"
    text = esc(human(value, key))
    if isinstance(ref, (int, float)) and not isinstance(ref, bool) and ref > 0:
        text += f'<span class="ratio">{esc(ratio(value / ref))} {esc(ref_name)}</span>'
    return f"<td>{text}</td>"


def measurement_table(rows: dict[str, dict[str, Any]], keys: list[str], reference: str | None) -> str:
    """Rows (arms or variants) by quantities, each value with its ratio to the reference row."""
    head = "".join(f"<th>{esc(quantity_title(k).replace(chr(10), ' '))}</th>" for k in keys)
    body = []
    for name, values in rows.items():
        ref = rows.get(reference, {}) if reference and name != reference else {}
        cells = "".join(_cell(values.get(k), k, ref.get(k), (reference or "").split(" ")[0]) for k in keys)
        body.append(f'<tr><th class="text">{esc(name)}</th>{cells}</tr>')
    return f'<table><tr><th class="text">{esc("")}</th>{head}</tr>{"".join(body)}</table>'


def headline(summary: dict[str, Any]) -> str:
    """One sentence per student: its quality beside the teacher's, and how much smaller and faster it is."""
    arms = summary.get("arms", {})
    teacher = arms.get("teacher")
    metric = (summary.get("metrics") or [None])[0]
    if not teacher or not metric:
        return ""
    lines = []
    for arm, values in arms.items():
        if arm == "teacher" or not isinstance(values.get(metric), (int, float)):
            continue
        parts = [f"{metric} {human(values[metric], metric)} (teacher {human(teacher[metric], metric)})"]
        for key, better, worse in (("params", "fewer parameters", "more parameters"),
                                   ("size_bytes", "smaller on disk", "larger on disk"),
                                   ("latency_ms", "faster at batch 1", "slower at batch 1")):
            if isinstance(values.get(key), (int, float)) and values[key] > 0 and teacher.get(key):
                gain = teacher[key] / values[key]
                parts.append(f"{ratio(gain)} {better}" if gain >= 1 else f"{ratio(1 / gain)} {worse}")
        lines.append(f"<li><b>{esc(arm)}</b>: {esc('; '.join(parts))}</li>")
    return f"<ul>{''.join(lines)}</ul>" if lines else ""


def _generated(text: Any) -> str:
    # Models early in training repeat newlines; keep paragraphs, drop the runs of blank lines.
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", str(text or "")).strip()
    return f'<div class="gen">{esc(text)}</div>'


def generations_table(generations: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for g in generations for k in g))
    head = "".join(f'<th class="text">{esc(c)}</th>' for c in columns)
    rows = "".join("<tr>" + "".join(f'<td class="text">{_generated(g.get(c))}</td>' for c in columns) + "</tr>"
                   for g in generations)
    return f"<table><tr>{head}</tr>{rows}</table>"


def export_section(record: dict[str, Any], chart: Path | None) -> str:
    title = f"{record.get('arm', 'student')} as {record.get('format')}"
    parts = [f"<h3>{esc(title)}</h3>", f"<p>Written to <code>{esc(record.get('path', ''))}</code>"]
    if record.get("size_bytes"):
        parts[-1] += f" ({esc(human(record['size_bytes'], 'size_bytes'))})"
    parts[-1] += ".</p>"
    check = record.get("check")
    if check:
        status = '<span class="ok">passed</span>' if check.get("passed") else '<span class="bad">FAILED</span>'
        diff = check.get("max_abs_diff")
        diff_text = f"{diff:.3g}" if isinstance(diff, (int, float)) else "-"
        parts.append(f"<p>onnxruntime vs PyTorch on {esc(check.get('inputs'))}: max |difference| {esc(diff_text)} "
                     f"(tolerance {esc(check.get('tolerance'))}): {status}.</p>")
    if record.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in record["notes"]) + "</ul>")
    rows = record.get("measurements") or {}
    if rows:
        keys = list(dict.fromkeys(k for v in rows.values() for k, x in v.items()
                                  if isinstance(x, (int, float)) and not isinstance(x, bool)))
        reference = "teacher (PyTorch)" if "teacher (PyTorch)" in rows else next(iter(rows))
        parts.append(image(chart, title))
        parts.append(measurement_table(rows, keys, reference))
    return "\n".join(parts)


def confusion_section(summary: dict[str, Any]) -> str:
    """Classifiers: each model's confusion matrix on the held-out split (rows: true label, columns: predicted)."""
    matrices = {arm: v["confusion"] for arm, v in summary.get("arms", {}).items() if v.get("confusion")}
    if not matrices:
        return ""
    n = len(next(iter(matrices.values())))
    labels = summary.get("labels") or [str(i) for i in range(n)]
    head = "".join(f"<th>{esc(name)}</th>" for name in labels)
    tables = []
    for arm, matrix in matrices.items():
        body = "".join(f'<tr><th class="text">{esc(labels[i])}</th>' + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                       for i, row in enumerate(matrix))
        tables.append(f'<h3>{esc(arm)}</h3><table><tr><th class="text">true \\ predicted</th>{head}</tr>{body}</table>')
    return ('<section id="confusion"><h2>Confusion matrices</h2><p>Held-out examples by true label (rows) and '
            f"predicted label (columns).</p>{''.join(tables)}</section>")


def render(summary: dict[str, Any], *, curves: Path | None, compare: Path | None, recipe_text: str,
           exports: list[tuple[dict[str, Any], Path | None]]) -> str:
    arms = summary.get("arms", {})
    reference = "teacher" if "teacher" in arms else None
    keys = comparison_keys(summary)
    meta = ", ".join(f"{k} {summary[k]}" for k in ("task", "device", "cpu", "torch_threads", "created") if summary.get(k))
    sections = [
        f"<h1>{esc(summary.get('recipe', 'run'))}: distillation report</h1><p class=\"sub\">{esc(meta)}</p>",
        headline(summary),
        '<section id="training"><h2>Training curves</h2>'
        "<p>Every loss term, the learning rate, the gradient norm and the evaluation metric, per arm, over "
        f"optimizer steps.</p>{image(curves, 'training curves')}</section>",
        '<section id="comparison"><h2>Teacher vs students</h2><p>Ratios are to the teacher. Latency is the median '
        "of timed forward passes; peak memory is the weights plus the peak a forward pass adds.</p>"
        f"{image(compare, 'teacher vs students')}{measurement_table(arms, keys, reference)}</section>",
    ]
    if summary.get("task") == "causal_lm" or summary.get("generations"):
        agreement = "".join(
            f"<li><b>{esc(arm)}</b>: {esc(human(v['agreement'], 'agreement'))}</li>"
            for arm, v in arms.items() if arm != "teacher" and isinstance(v.get("agreement"), (int, float)))
        sections.append(
            '<section id="lm"><h2>Language model</h2><p>Top-1 next-token agreement with the teacher on held-out '
            f"text:</p><ul>{agreement or '<li>not measured</li>'}</ul><h3>Generations side by side</h3>"
            f"{generations_table(summary.get('generations') or [])}</section>")
    sections.append(confusion_section(summary))
    if exports:
        sections.append('<section id="export"><h2>Export</h2>'
                        + "".join(export_section(record, chart) for record, chart in exports) + "</section>")
    versions = summary.get("versions") or {}
    version_rows = "".join(f'<tr><th class="text">{esc(k)}</th><td class="text">{esc(v)}</td></tr>'
                           for k, v in versions.items())
    sections.append(f'<section id="recipe"><h2>Resolved recipe</h2><pre>{esc(recipe_text)}</pre></section>')
    sections.append(f'<section id="versions"><h2>Versions</h2><table>{version_rows}</table></section>')
    body = "\n".join(s for s in sections if s)
    title = esc(f"{summary.get('recipe', 'run')} report")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
