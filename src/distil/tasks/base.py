"""The task seam: what the runner asks of a task (classification, causal LM, sentence embedding, ...).

A task is one module with one object satisfying `Task`, listed in `distil.tasks.TASKS`. The runner
(`distil.runner`) owns what every task shares: the run directory, the arm loop with skip-if-done, rank-agreed
decisions under torchrun, atomic model folders, summary.json, the end-of-run table and report.html. The task owns
what differs: its recipe rules, pre-flight checks, data, teacher and student, each arm's objective, the evaluation
of each model into a summary row, and how its models are saved and their memory estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import torch
from rich.console import Console

from distil.config.schema import SELF_DISTILL_ARMS, Recipe
from distil.estimate.memory import MemoryEstimate
from distil.train.metrics import MetricsLog


@dataclass
class RunContext:
    """What every stage of one run shares."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    metrics: MetricsLog
    console: Console
    show_progress: bool


class TaskRun(Protocol):
    """One run of a task, after its data, teachers and initial student are ready (`Task.start`)."""

    metrics: list[str]  # the quality metrics of its summary rows, in table order

    def train_arm(self, arm: str, folder: Path) -> None:
        """Train `arm` from the initial student and save it into `folder` (the runner skips arms already saved)."""
        ...

    def measure(self) -> dict[str, dict[str, Any]]:
        """Rank 0, after every arm: one summary row per model (teachers, initial student, arms), in table order."""
        ...

    def summary_fields(self) -> dict[str, Any]:
        """Task-specific entries of summary.json besides the rows (e.g. held-out sizes, generations)."""
        ...

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The written summary, completed with what needs it (e.g. response perplexities); printed extras."""
        ...


class Task(Protocol):
    name: str
    estimate: Callable[[Recipe], MemoryEstimate] | None  # the run's memory estimate; None: the task has none yet

    def rules(self, recipe: Recipe) -> list[str]:
        """The recipe rules of this task (which data, models, arms and sections it accepts), one line each."""
        ...

    def problems(self, recipe: Recipe) -> list[str]:
        """Pre-flight checks that load nothing: files and model sources exist, budgets are possible."""
        ...

    def deep_problems(self, recipe: Recipe) -> list[str]:
        """Pre-flight checks that load the data and build the models (`distil validate`)."""
        ...

    def start(self, ctx: RunContext) -> TaskRun:
        """Load the data, the teachers (training them in a teacher stage when needed) and the initial student."""
        ...


def not_causal_lm_rules(recipe: Recipe) -> list[str]:
    """Sections only token-level language-model distillation reads."""
    found = []
    if recipe.method != "logits" or recipe.onpolicy or recipe.generate:
        found.append("method, onpolicy and generate apply to task causal_lm only")
    if recipe.teacher.lora is not None:
        found.append("teacher.lora applies to task causal_lm (its teacher stage)")
    if recipe.teacher.cache is not None:
        found.append("teacher.cache applies to off-policy logit distillation of causal LMs (task causal_lm, method "
                     "logits, no onpolicy section)")
    return found


def data_and_model_rules(recipe: Recipe, data_kinds: str | tuple[str, ...], archs: tuple[str, ...]) -> list[str]:
    found = []
    kinds = (data_kinds,) if isinstance(data_kinds, str) else data_kinds
    if recipe.data.kind not in kinds:
        found.append(f"task {recipe.task} needs data.kind: {' or '.join(kinds)} (got {recipe.data.kind})")
    if recipe.student.lora is not None and recipe.task != "causal_lm":
        found.append("student.lora applies to task causal_lm")
    for who, model in (("teacher", recipe.teacher.model), ("student", recipe.student.model)):
        if model.arch not in archs:
            found.append(f"task {recipe.task}: {who}.model.arch must be one of {list(archs)}, got {model.arch}")
    return found


def language_model_rules(recipe: Recipe) -> list[str]:
    """Rules shared by the tasks of Hugging Face transformers (causal LM, embedding)."""
    found = []
    odd = [a for a in recipe.arms if a in SELF_DISTILL_ARMS]
    if odd:
        found.append(f"arms {odd} are for task classification; task {recipe.task} has student_alone, logit_kd and "
                     "distilled")
    if recipe.multi_teacher is not None:
        found.append("multi_teacher is for task classification")
    if recipe.loss.divergence == "dkd":
        found.append("loss.divergence dkd is for classifiers; language models use forward_kl, jsd, ...")
    return found
