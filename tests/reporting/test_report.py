"""The run report: every section present for a real tiny run, plots embedded, nothing fetched from outside."""

from __future__ import annotations

import base64
import json
import re

import pytest

from distil.cli import main
from distil.errors import DistilError
from distil.reporting import build_report
from distil.reporting.plots import comparison_keys, curve_keys, ratio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def sections(page: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', page))


def assert_offline(page: str) -> None:
    """No URL outside data URIs, every src/href a data URI, no script or stylesheet link that could fetch."""
    bare = DATA_URI.sub("data:image/png;base64,", page)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", bare, re.IGNORECASE)
    for attr in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page, re.IGNORECASE):
        assert attr.startswith("data:"), attr
    assert "<script" not in bare.lower() and "<link" not in bare.lower() and "@import" not in bare
    assert "url(" not in bare


def test_a_real_run_leaves_a_report_with_every_section(digits_run):
    page = (digits_run / "report.html").read_text()
    assert {"training", "comparison", "recipe", "versions"} <= sections(page)
    assert "lm" not in sections(page) and "export" not in sections(page)  # no LM, nothing exported yet
    # The plots are files beside the report, and the very same bytes are embedded in it.
    files = sorted((digits_run / "report").glob("*.png"))
    assert [f.name for f in files] == ["comparison.png", "training_curves.png"]
    embedded = [base64.b64decode(m) for m in DATA_URI.findall(page)]
    assert sorted(embedded) == sorted(f.read_bytes() for f in files)
    assert all(blob.startswith(PNG_MAGIC) for blob in embedded)
    # The resolved recipe and the library versions, so that the run can be repeated.
    summary = json.loads((digits_run / "summary.json").read_text())
    assert "name: digits-kd" in page and "steps: 20" in page
    for library, version in summary["versions"].items():
        assert f">{library}<" in page and f">{version}<" in page
    # ... and what it ran on: speed differs between CPU kinds.
    assert summary["cpu"] and f"cpu {summary['cpu']}" in page
    assert_offline(page)


def test_the_curves_cover_every_loss_term_lr_and_evaluation_of_each_arm(digits_run):
    records = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    keys = curve_keys(records)
    assert keys[:3] == ["loss", "loss/ce", "loss/kd"]
    assert {"lr", "grad_norm", "eval/accuracy"} <= set(keys)
    assert "samples_per_s" not in keys and "time_s" not in keys  # machine speed is not a training curve
    arms = {r["arm"] for r in records if "eval/accuracy" in r}
    assert arms == {"teacher", "student_alone", "distilled"}


def test_the_comparison_shows_quality_size_speed_and_memory_with_ratios_to_the_teacher(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    keys = comparison_keys(summary)
    assert keys == ["accuracy", "macro_f1", "params", "size_bytes", "latency_ms", "samples_per_s_b256",
                    "peak_memory_bytes"]
    teacher, student = summary["arms"]["teacher"], summary["arms"]["distilled"]
    for arm in summary["arms"].values():
        assert arm["samples_per_s_b256"] > 0 and arm["peak_memory_batch"] == 256
        assert arm["peak_memory_bytes"] is None or arm["peak_memory_bytes"] > 0
    page = (digits_run / "report.html").read_text()
    # The ratio of the student's parameter count to the teacher's is written beside the number.
    assert f"{ratio(student['params'] / teacher['params'])} teacher" in page
    assert ratio(0.1712) == "0.17×" and ratio(5.73) == "5.73×" and ratio(250.4) == "250×"


def test_distil_report_rebuilds_the_report(digits_run, capsys):
    (digits_run / "report.html").unlink()
    assert main(["report", str(digits_run)]) == 0
    assert (digits_run / "report.html").is_file() and "report.html" in capsys.readouterr().out


def test_report_of_an_unfinished_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(DistilError, match="distil resume"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "Traceback" not in err


def test_a_language_model_report_shows_agreement_and_generations(lm_run):
    page = build_report(lm_run).read_text()
    assert {"training", "comparison", "lm", "recipe", "versions"} <= sections(page)
    summary = json.loads((lm_run / "summary.json").read_text())
    lm_section = page[page.index('<section id="lm">'):]
    lm_section = lm_section[: lm_section.index("</section>")]
    assert "Top-1 next-token agreement" in lm_section and "40.00%" in lm_section and "50.00%" in lm_section
    for generation in summary["generations"]:
        assert generation["prompt"] in lm_section and generation["distilled"] in lm_section
    # Generated text is escaped, never interpreted as markup.
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in lm_section and "<b>bold</b>" not in lm_section
    records = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    assert curve_keys(records) == ["loss", "loss/ce", "loss/kd", "lr", "grad_norm", "eval/perplexity"]
    assert comparison_keys(summary) == ["perplexity", "agreement", "params", "size_bytes", "tokens_per_s_b1",
                                        "tokens_per_s_b8", "peak_memory_bytes"]
    assert_offline(page)
