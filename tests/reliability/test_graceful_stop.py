"""Graceful stop at the command line: a real `python -m distil run` subprocess, signalled from outside.

The run is paused at a known point by the fault injector (loaded by tests/reliability/inject/sitecustomize.py), the
test sends the signal, then releases it. SIGTERM (or one Ctrl-C) finishes the step, saves, prints how to resume and
exits 0, and `distil resume` then ends equal to an uninterrupted run; a second Ctrl-C stops at once, with no
traceback, and the last periodic checkpoint still resumes exactly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_harness
from reliability_runs import Run, assert_equals_reference


def nth_event(reference: Run, kind: str, stage: str, n: int = 1) -> int:
    matches = [e[0] for e in reference.events if e[1] == kind and e[3] == stage]
    return matches[n - 1]


def start_paused(run: Run, event: int, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m distil run ...`, paused just before `event` until the release file exists."""
    marker, release = tmp_path / "paused", tmp_path / "release"
    plan = {"pause_at": event, "marker": str(marker), "release": str(release)}
    process = subprocess.Popen([sys.executable, "-m", "distil", *run.run_args()], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=fault_harness.subprocess_env(plan, **run.env))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached the pause point"
        time.sleep(0.02)
    return process, release


def resume(run: Run, tmp_path: Path) -> None:
    code, child = fault_harness.run(["resume", str(run.run_dir), "-q"], env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()


def test_sigterm_finishes_the_step_saves_prints_how_to_resume_and_exits_0(reference, tmp_path):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    # Inside step 5 of the first arm (just after its optimizer update): off the save_every=3 schedule.
    process, release = start_paused(run, nth_event(reference, "step", "student_alone", 5), tmp_path)
    process.send_signal(signal.SIGTERM)
    release.touch()
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert "Traceback" not in out + err
    assert f"stopped at step 5 of 'student_alone'; checkpoint saved. Continue with: distil resume {run.run_dir}" in err
    assert (run.run_dir / "checkpoints" / "student_alone" / "step-00000005").is_dir()
    assert not (run.run_dir / "student_alone").exists() and not (run.run_dir / "checkpoints" / "distilled").exists()
    resume(run, tmp_path)
    assert_equals_reference(reference, run)


def test_sigterm_between_stages_stops_before_the_next_one(reference, tmp_path):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    process, release = start_paused(run, nth_event(reference, "stage", "distilled"), tmp_path)
    process.send_signal(signal.SIGTERM)
    release.touch()
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert f"stopped at step 0 of 'distilled'. Continue with: distil resume {run.run_dir}" in err
    assert "Traceback" not in out + err
    assert not (run.run_dir / "checkpoints" / "distilled").exists()
    resume(run, tmp_path)
    assert_equals_reference(reference, run)


def test_second_ctrl_c_stops_at_once_without_a_traceback(reference, tmp_path):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    process, _ = start_paused(run, nth_event(reference, "step", "student_alone", 5), tmp_path)
    process.send_signal(signal.SIGINT)  # first: finish the step and save (it stays paused: the release never comes)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # second: stop now
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1] == (f"interrupted; the last saved checkpoint is intact (distil resume "
                                            f"{run.run_dir} continues from it)")
    # It did not finish the step to save: only the periodic checkpoint (step 3) exists, and it resumes exactly.
    saved = sorted(p.name for p in (run.run_dir / "checkpoints" / "student_alone").iterdir())
    assert saved == ["step-00000003"]
    resume(run, tmp_path)
    assert_equals_reference(reference, run)
