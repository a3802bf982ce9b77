"""The command line end to end: validation errors, a real run of digits-kd, resume."""

import json
import os
import subprocess
import sys

import pytest

from distil.cli import main

pytest.importorskip("sklearn", reason="digits-kd needs scikit-learn (pip install 'distil[classic]')")


def cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "distil", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_validate_reports_each_problem_on_one_line_with_exit_2_and_no_traceback():
    result = cli("validate", "digits-kd", "loss.temprature=3", "train.steps=many", "loss.temperature=-1",
                 "loss.alpha=1.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.stderr + result.stdout
    assert "did you mean 'temperature'" in result.stderr


def test_validate_reports_a_missing_data_file_with_the_package_name(tmp_path):
    result = cli("validate", "fashion-mnist-kd", f"data.path={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "dataset-fashion-mnist" in line and "data.path" in line


def test_validate_prints_the_resolved_recipe(tmp_path):
    result = cli("validate", "digits-kd", "train.steps=3")
    assert result.returncode == 0, result.stderr
    assert "steps: 3" in result.stdout


def test_recipes_lists_the_builtins():
    result = cli("recipes")
    assert result.returncode == 0 and "digits-kd" in result.stdout and "fashion-mnist-kd" in result.stdout


def test_run_digits_kd_end_to_end_then_resume_is_a_no_op(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert main(["run", "digits-kd", "-q", f"output_dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"teacher", "student_alone", "distilled"}
    for values in arms.values():
        assert 0.1 < values["accuracy"] <= 1.0 and values["params"] > 0 and values["size_bytes"] > 0
        assert values["latency_ms"] > 0
    # The distilled student beats the same student trained alone (and the teacher is stronger than both).
    assert arms["distilled"]["accuracy"] > arms["student_alone"]["accuracy"]
    assert arms["teacher"]["accuracy"] > arms["distilled"]["accuracy"]
    assert arms["teacher"]["params"] > 5 * arms["distilled"]["params"]
    for name in ("recipe.yaml", "metrics.jsonl", "student/model.safetensors", "student/config.json",
                 "student_alone/model.safetensors"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    distilled = [r for r in records if r["arm"] == "distilled" and "loss" in r]
    assert {"loss", "loss/ce", "loss/kd", "lr", "samples_per_s"} <= set(distilled[-1])
    assert any("eval/accuracy" in r for r in records if r["arm"] == "distilled")
    assert "teacher vs students" in capsys.readouterr().out

    # A second run into the same directory is refused; resume finds everything done and only re-measures.
    assert main(["run", "digits-kd", "-q", f"output_dir={run_dir}"]) == 2
    before = (run_dir / "metrics.jsonl").read_text()
    assert main(["resume", str(run_dir), "-q"]) == 0
    assert (run_dir / "metrics.jsonl").read_text() == before
    again = json.loads((run_dir / "summary.json").read_text())["arms"]
    assert again["distilled"]["accuracy"] == arms["distilled"]["accuracy"]


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
