"""Exact resume under SIGKILL.

A run is killed (SIGKILL: nothing of the process runs after it) at a chosen moment: inside the teacher stage, while
a checkpoint is being written, sealed or renamed, while the teacher moves into the cache, between the arms, while
the final student is saved, before the report's rename, at events drawn at random, and at random wall-clock times.
It is then continued with `distil resume RUN_DIR` (or `distil run` again when it died before writing its recipe),
which half of the scenarios kill once more. Every scenario must end with the teacher and both students bitwise equal
to the uninterrupted run, the same metrics.jsonl (wall-clock fields aside), and no temporary file left behind.

Moments are events of fault_harness (each optimizer step, metric write, checkpoint write, fsync, rename, removal,
stage start), drawn with a fixed seed from the reference run's own event list, so every run of the test tries the
same kill points. Every kill must land: a run that finishes instead fails the scenario. A kill at a random time lands
anywhere in the run, or, if the run got there first (a fast machine), while it waits just before its last rename
(the report's): a kill that lands either way, and the resume of a time kill is killed at a random time too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

import fault_harness
from reliability_runs import CASES, COUNTS, Run, assert_equals_reference

SEED = 6  # the number: any fixed seed makes the drawn kill points reproducible

Event = tuple[int, str, str, str]  # (number, kind, detail, stage)
TARGETED: dict[str, Callable[[str, str, str], bool]] = {
    "teacher stage, after an optimizer step": lambda kind, detail, stage: kind == "step" and stage == "teacher",
    "teacher checkpoint, writing its files": lambda kind, detail, stage: (
        stage == "teacher" and kind in ("save_tensors", "write_json") and "/.step-" in detail),
    "teacher weights, moving into the cache": lambda kind, detail, stage: kind == "replace" and "/teachers/" in detail,
    "between the arms": lambda kind, detail, stage: kind == "stage" and detail == "distilled",
    "arm checkpoint, before its seal": lambda kind, detail, stage: (
        kind == "write_json" and detail.endswith("/COMPLETE") and stage != "teacher"),
    "arm checkpoint, before its rename": lambda kind, detail, stage: (
        kind == "replace" and re.search(r"\.tmp-\d+ -> .*/step-\d+$", detail) is not None and stage != "teacher"),
    "arm, removing an old checkpoint": lambda kind, detail, stage: kind == "rmtree" and stage != "teacher",
    "arm, writing a metrics line": lambda kind, detail, stage: kind == "metrics" and stage == "distilled",
    "final student, moving into place": lambda kind, detail, stage: kind == "replace" and detail.endswith("/student"),
    "report, before its rename": lambda kind, detail, stage: kind == "replace" and detail.endswith("/report.html"),
}
RANDOM_EVENTS = [f"random event {i}" for i in range(3)]
RANDOM_TIMES = [f"random time {i}" for i in range(2)]
SCENARIOS = list(TARGETED) + RANDOM_EVENTS + RANDOM_TIMES
BACKSTOP = "/report.html"  # in the detail of every run's last event: where a time kill waits if the run got there


def choose(scenario: str, reference: Run) -> tuple[tuple[str, float], tuple[str, float] | None]:
    """(first kill, second kill or None), each as ("event", n) or ("time", seconds)."""
    rng = random.Random(f"{SEED}:{reference.case.recipe}:{scenario}")
    events: list[Event] = [tuple(e) for e in reference.events]  # type: ignore[misc]
    if scenario in TARGETED:
        candidates = [n for n, kind, detail, stage in events if TARGETED[scenario](kind, detail, stage)]
        if not candidates:
            pytest.skip(f"{reference.case.recipe} has no moment '{scenario}'")
        first: tuple[str, float] = ("event", rng.choice(candidates))
    elif scenario in RANDOM_EVENTS:
        first = ("event", rng.randint(1, len(events)))
    else:
        first = ("time", rng.uniform(0.05, reference.seconds))
    if rng.random() >= 0.5:
        return first, None
    if first[0] == "time":  # where it landed is unknown: the resume is killed at a random time as well
        return first, ("time", rng.uniform(0.05, reference.seconds / 2))
    # The resumed process has at least the events the first one did not reach (plus the redone ones since the last
    # checkpoint): draw the second kill among those, so that it lands.
    return first, ("event", rng.randint(1, max(1, len(events) - int(first[1]))))


def kill(run: Run, args: list[str], moment: tuple[str, float], logs) -> None:
    """Run `distil args` and kill it at `moment`; the kill must land."""
    if moment[0] == "event":
        code, child = fault_harness.run(args, env=run.env, logs=logs, plan={"kill_at": moment[1]})
        assert code == -9, f"the kill at event {moment[1]} did not happen (exit {code}):\n{child.output()}"
        return
    marker = logs / f"backstop-{moment[1]}"
    plan = {"pause_on": BACKSTOP, "marker": str(marker), "release": str(logs / "never")}
    child = fault_harness.start(args, env=run.env, logs=logs, plan=plan)
    child.process.join(moment[1])
    child.process.kill()
    code = child.wait()
    assert code == -9, f"the kill at {moment[1]:.2f} s did not happen (exit {code}):\n{child.output()}"
    COUNTS["time_kills"] += 1
    COUNTS["time_kills_at_backstop"] += marker.exists()


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_bitwise_equal(case: str, scenario: str, make_reference, tmp_path) -> None:
    reference = make_reference(case)
    first, second = choose(scenario, reference)
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    logs = tmp_path / "logs"
    logs.mkdir()
    assert BACKSTOP in reference.events[-1][2], reference.events[-1]
    kill(run, run.run_args(), first, logs)
    if second is not None:
        kill(run, run.next_args(), second, logs)

    code, child = fault_harness.run(run.next_args(), env=run.env, logs=logs)
    assert code == 0, child.output()
    assert "Traceback" not in child.output()
    assert_equals_reference(reference, run)
    COUNTS["delivered"] += 1 + (second is not None)
    COUNTS["scenarios"] += 1
