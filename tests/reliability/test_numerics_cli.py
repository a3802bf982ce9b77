"""A diverging run at the command line: one line naming the stage, step, loss term and last good checkpoint; exit 2.

lr=1e30 without clipping sends the first AdamW update to ~1e30 per weight; the next forward pass overflows to inf
and the cross-entropy becomes NaN, deterministically, at step 2."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from distil.cli import main
from reliability_runs import Run

DIVERGE = ("train.lr=1e30", "train.clip_grad_norm=null", "train.save_every=1")


def test_a_nan_loss_stops_the_run_with_one_line_and_exit_2(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTIL_CACHE", str(reference.cache))  # reuse the reference's teacher
    run = Run(reference.case, tmp_path / "run", reference.cache)
    assert main(run.run_args(*DIVERGE)) == 2
    checkpoint = run.run_dir / "checkpoints" / "student_alone" / "step-00000001"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: stage 'student_alone': non-finite loss term 'ce' (nan) at step 2; last good checkpoint: {checkpoint}. "
        "Lower train.lr, enable train.clip_grad_norm, or set train.max_nonfinite_skips=N to skip such steps"
    ]
    weights = load_file(checkpoint / "modules.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the named checkpoint is indeed good
    assert not (run.run_dir / "checkpoints" / "student_alone" / "step-00000002").exists()


def test_skipped_non_finite_steps_are_logged_then_the_run_stops(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTIL_CACHE", str(reference.cache))
    run = Run(reference.case, tmp_path / "run", reference.cache)
    assert main(run.run_args(*DIVERGE, "train.max_nonfinite_skips=2")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "non-finite loss term 'ce' (nan) at step 2" in line
    records = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped_nonfinite" in r]
    assert [(r["arm"], r["step"]) for r in skipped] == [("student_alone", 2), ("student_alone", 2)]
