"""Exact resume of the language-model paths under SIGKILL, on a tiny Llama built on the fly.

Each path runs once uninterrupted (the reference, with its list of events), then killed: the run is SIGKILLed at a
chosen moment, each `distil resume` but the last is SIGKILLed again at another, and the last finishes it. The
finished run must hold the same student weights, bit for bit, and the same metrics.jsonl (wall-clock fields aside)
as the reference, plus the same bytes of what the path writes on the way (the teacher's answers, the cache's shards
and manifest), and no temporary file. Every kill must land (exit -9).

Paths and kill points (events of fault_harness; `forward` is one forward pass of a causal LM, one per generated token):
- fused token-level KD (arm logit_kd) then feature terms with projectors (arm distilled, FitNets: a projector per
  layer pair): after logit_kd's optimizer step 3, before its metrics line; then while the resume writes distilled's
  step-4 checkpoint (its optimizer state, after the modules: student and projectors); then after the next resume's
  first step of distilled (projectors and their optimizer state restored from step 2).
- on-policy (GKD): in the middle of the student's sampling for the second on-policy step after the first
  checkpoint; then after the resume's 2nd optimizer step (sampling RNG and data position restored from the
  checkpoint).
- response distillation: in the middle of the teacher's sampling of its second batch of answers; then after the
  resume's 3rd fine-tuning step.
- cache build and cache-fed training: before the first shard's record moves into place (its data file is there,
  the record a temporary); then after the resume's 3rd training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import fault_harness
from reliability_runs import COUNTS, assert_same_weights, read_metrics, strip_timing

Events = list[list[Any]]  # [number, kind, detail, stage]
Plan = dict[str, Any]


def _mid_sampling(events: Events, *, before_training: bool) -> Plan:
    """A kill at the middle forward pass of the second generation: a run of forward passes with nothing else in
    between, before training (the teacher's second batch of answers, after the first was written) or after the first
    checkpoint (an on-policy step's sampling)."""
    first_stage = next(n for n, kind, *_ in events if kind == "stage")
    first_save = next(n for n, kind, *_ in events if kind == "save_tensors")
    last_step = max(n for n, kind, *_ in events if kind == "step")
    runs: list[list[int]] = [[]]
    for n, kind, *_ in events:
        inside = n < first_stage if before_training else first_save < n < last_step
        if kind == "forward" and inside:
            runs[-1].append(n)
        elif runs[-1]:
            runs.append([])
    generations = [run for run in runs if len(run) >= 4]
    assert len(generations) >= 2, f"no second generation in the reference's events: {runs}"
    return {"kill_at": generations[1][len(generations[1]) // 2]}


@dataclass(frozen=True)
class LMPath:
    recipe: dict[str, Any]  # merged over BASE; "{root}" in a string is the run's own folder
    first: Callable[[Events], Plan]  # the first kill, from the reference's events
    then: tuple[list[Any], ...]  # the kills of the resumes, each kill_on [kind, text, n]
    outputs: tuple[str, ...] = ()  # other files that must be byte-equal, relative to the run's folder
    arms: tuple[str, ...] = ("student",)
    landed: Callable[[Path], bool] | None = None  # what the run's folder shows after the first kill


BASE: dict[str, Any] = {
    "name": "tiny-lm-kill", "task": "causal_lm",
    "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 24,
             "max_train_tokens": 1200, "eval_tokens": 96},
    "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
    "loss": {"alpha": 0.5, "temperature": 2.0},
    "train": {"steps": 6, "batch_size": 4, "log_every": 1, "eval_every": 3, "save_every": 2},
    "arms": ["distilled"], "generations_shown": 0, "latency_runs": 1,
}
PATHS = {
    # Arm logit_kd is fused token-level KD alone; arm distilled adds the feature terms (a FitNets projector per
    # layer pair), whose projectors the checkpoints must carry.
    "fused token-level KD, then feature terms with projectors": LMPath(
        {"arms": ["logit_kd", "distilled"],
         "loss": {"features": [{"student": "model.layers.{}", "teacher": "model.layers.{}", "loss": "fitnets",
                                "weight": 0.5}]}},
        lambda events: {"kill_on": ["metrics", "logit_kd 3", 1]},
        (["save_tensors", "/distilled/.step-00000004", 2], ["step", "", 1]),
        arms=("logit_kd", "student")),
    "on-policy sampling": LMPath(
        {"loss": {"divergence": "generalized_jsd", "beta": 0.5},
         "onpolicy": {"lmbda": 0.5, "prompt_tokens": 8, "max_new_tokens": 8}},
        lambda events: _mid_sampling(events, before_training=False), (["step", "", 2],)),
    "response generation then fine-tuning": LMPath(
        {"method": "response", "data": {"seq_len": 48},
         "generate": {"num_prompts": 8, "eval_prompts": 2, "prompt_lines": 1, "max_new_tokens": 8, "batch_size": 3,
                      "do_sample": True, "temperature": 1.2}},
        lambda events: _mid_sampling(events, before_training=True), (["step", "", 3],),
        ("run/generations.jsonl", "run/eval_generations.jsonl"),
        landed=lambda root: len((root / "run" / "generations.jsonl").read_text().splitlines()) == 3),  # batch 0
    "cache build and cache-fed training": LMPath(
        {"teacher": {"cache": {"path": "{root}/teacher-cache", "mode": "topk", "k": 8, "shard_size": 16,
                               "batch_size": 4}}},
        lambda events: {"kill_on": ["replace", "/shard-", 2]}, (["step", "", 3],),
        ("teacher-cache/manifest.json", "teacher-cache/shard-*"),
        landed=lambda root: not (root / "teacher-cache/shard-000000.json").exists() and sorted(
            p.name.split(".tmp-")[0] for p in (root / "teacher-cache").glob("shard-*")) == [
            "shard-000000.json", "shard-000000.safetensors"]),  # the data file; the record still a temporary
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def _fill(value: Any, root: Path) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, root) for v in value]
    return value.replace("{root}", str(root)) if isinstance(value, str) else value


def _files(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    found = [p for pattern in patterns for p in sorted(root.glob(pattern))]
    assert found or not patterns, f"none of {patterns} under {root}"
    return found


class Job:
    """One run of a path in its own folder: the recipe file, the run directory, and the commands."""

    def __init__(self, path: LMPath, tiny_lm: Path, root: Path):
        self.root, self.run_dir, self.logs = root, root / "run", root / "logs"
        recipe = _fill(_merge(BASE, path.recipe), root)
        recipe["teacher"] = {**recipe.get("teacher", {}), "model": {"arch": "hf", "source": str(tiny_lm)}}
        self.recipe = root / "recipe.yaml"
        root.mkdir(parents=True, exist_ok=True)
        self.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.env = {"DISTIL_CACHE": str(root / "distil-cache")}

    def next_args(self) -> list[str]:
        if (self.run_dir / "recipe.yaml").exists():
            return ["resume", str(self.run_dir), "-q"]
        return ["run", str(self.recipe), "-q", f"output_dir={self.run_dir}"]

    def run(self, plan: Plan | None = None) -> tuple[int, Any]:
        return fault_harness.run(self.next_args(), env=self.env, logs=self.logs, plan=plan)


@pytest.mark.parametrize("name", list(PATHS))
def test_killed_lm_run_resumes_bitwise_equal(name: str, tiny_lm: Path, tmp_path: Path) -> None:
    path = PATHS[name]
    reference = Job(path, tiny_lm, tmp_path / "reference")
    code, child = reference.run({"record": True})
    assert code == 0, child.output()
    events = child.outcome()["events"]
    job = Job(path, tiny_lm, tmp_path / "killed")
    plans = [path.first(events), *({"kill_on": target} for target in path.then)]
    for i, plan in enumerate(plans):
        code, child = job.run(plan)
        assert code == -9, f"the kill {plan} did not happen (exit {code}):\n{child.output()}"
        if i == 0 and path.landed is not None:
            assert path.landed(job.root), f"the first kill {plan} landed elsewhere"
    code, child = job.run()
    assert code == 0, child.output()
    assert "Traceback" not in child.output()

    for arm in path.arms:
        assert_same_weights(reference.run_dir / arm / "model.safetensors", job.run_dir / arm / "model.safetensors")
    assert strip_timing(read_metrics(job.run_dir)) == strip_timing(read_metrics(reference.run_dir))
    for expected, got in zip(_files(reference.root, path.outputs), _files(job.root, path.outputs), strict=True):
        assert expected.name == got.name and expected.read_bytes() == got.read_bytes(), got
    leftovers = [p for p in job.root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert leftovers == []
    COUNTS["delivered"] += len(plans)
    COUNTS["scenarios"] += 1
