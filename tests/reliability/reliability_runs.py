"""Shared pieces of the reliability tests: the recipes they run, uninterrupted references, and comparisons."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

import fault_harness
from distil.train.metrics import TIMING_KEYS


@dataclass(frozen=True)
class Case:
    """A recipe the fault-injection tests run. `outputs`: the weight files a finished run holds, relative to the run
    directory, or to $DISTIL_CACHE with a "cache:" prefix (a glob)."""

    recipe: str
    overrides: tuple[str, ...]
    outputs: tuple[str, ...]


# digits-kd, small enough for CI, yet every part runs: a teacher stage, two arms, several checkpoints per stage,
# periodic and final evaluations, and dropout in both models (so the RNG state must be restored exactly).
# A pipeline added later (an LM recipe) adds its case here; the kill test runs every case.
CASES = {
    "digits-kd": Case(
        "digits-kd",
        (
            "teacher.train.steps=12", "teacher.train.save_every=3", "teacher.train.log_every=2",
            "train.steps=12", "train.save_every=3", "train.log_every=2", "train.eval_every=6",
            "student.model.dropout=0.2", "teacher.model.dropout=0.1", "latency_runs=1",
        ),
        ("student/model.safetensors", "student_alone/model.safetensors", "cache:teachers/*/model.safetensors"),
    ),
}

# Reported at the end of the session (tests/reliability/conftest.py): kills the kill tests delivered in scenarios
# that then passed (and how many of the random-time ones found the run already waiting at its last rename), and
# inputs the recipe fuzzer tried.
COUNTS: dict = {"delivered": 0, "scenarios": 0, "time_kills": 0, "time_kills_at_backstop": 0, "fuzzed": 0,
                "estimates": []}


@dataclass
class Run:
    case: Case
    run_dir: Path
    cache: Path
    events: list = field(default_factory=list)
    seconds: float = 0.0  # how long the run itself took (from distil.cli.main's start to its end)

    @property
    def env(self) -> dict[str, str]:
        return {"DISTIL_CACHE": str(self.cache)}

    def run_args(self, *extra: str) -> list[str]:
        return ["run", self.case.recipe, "-q", f"output_dir={self.run_dir}", *self.case.overrides, *extra]

    def next_args(self) -> list[str]:
        """`distil resume` once the run directory holds a run, else `distil run` (killed before it wrote one)."""
        return ["resume", str(self.run_dir), "-q"] if (self.run_dir / "recipe.yaml").exists() else self.run_args()

    def outputs(self) -> list[Path]:
        found = []
        for output in self.case.outputs:
            if output.startswith("cache:"):
                matches = sorted(self.cache.glob(output.removeprefix("cache:")))
                assert len(matches) == 1, f"{output}: {matches}"
                found.append(matches[0])
            else:
                found.append(self.run_dir / output)
        return found


def reference_run(case: Case, root: Path) -> Run:
    """The uninterrupted run that interrupted ones must equal, with the list of its events."""
    run = Run(case, root / "run", root / "cache")
    code, child = fault_harness.run(run.run_args(), env=run.env, logs=root / "logs", plan={"record": True})
    assert code == 0, child.output()
    run.events, run.seconds = child.outcome()["events"], child.outcome()["seconds"]
    return run


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, strictly: a torn or garbled line fails the test."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), f"{b}: {key} differs from {a}"


def assert_equals_reference(reference: Run, run: Run) -> None:
    """Bitwise the same final weights and the same metrics (timing fields aside); no temporary file left behind."""
    for expected, got in zip(reference.outputs(), run.outputs(), strict=True):
        assert_same_weights(expected, got)
    assert strip_timing(read_metrics(run.run_dir)) == strip_timing(read_metrics(reference.run_dir))
    leftovers = [p for root in (run.run_dir, run.cache) for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert leftovers == []
