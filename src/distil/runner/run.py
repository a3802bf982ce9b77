"""One run, whatever its task: the task's data, teachers and initial student, then each arm trained from that student
(skipped when its folder already holds it), then every model measured into summary.json, the end-of-run table and
report.html. Recipes come in through `run_task`, Python objects through `distil.distill`; both go through
`run_arms`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distil.config.schema import Recipe
from distil.errors import DistilError
from distil.measure.machine import cpu_model
from distil.reporting import build_report
from distil.reporting.summary import print_summary, write_summary
from distil.tasks.artifacts import arm_folder, is_model_folder, pick_device
from distil.tasks import task_of
from distil.tasks.base import RunContext, TaskRun
from distil.train import distributed
from distil.train.metrics import MetricsLog


def run_task(recipe: Recipe, run_dir: Path, *, show_progress: bool = True, console: Console | None = None
             ) -> dict[str, Any]:
    """Train and measure every arm of `recipe` in `run_dir` (resuming what an earlier call left); returns the summary
    (empty on ranks > 0, which write nothing)."""
    console = console or Console()
    task = task_of(recipe.task)
    device = pick_device(recipe.train.device)
    found = task.problems(recipe)
    if found:
        raise DistilError(found[0])
    ctx = RunContext(recipe, Path(run_dir), device, MetricsLog(Path(run_dir) / "metrics.jsonl"), console,
                     show_progress)
    try:
        run = task.start(ctx)
    except BaseException:
        ctx.metrics.close()
        raise
    return run_arms(run, recipe.arms, ctx.run_dir, {"recipe": recipe.name, "task": recipe.task}, device=device,
                    metrics=ctx.metrics, console=console)


def run_arms(run: TaskRun, arms: Sequence[str], run_dir: Path, head: dict[str, Any], *, device: torch.device,
             metrics: MetricsLog, console: Console, report: bool = True) -> dict[str, Any]:
    """The arm loop every run goes through, recipes and `distil.distill` alike: each arm trained from the initial
    student unless its folder already holds it, then every model measured into summary.json (`head` first), the
    end-of-run table and report.html. Closes `metrics`; returns the summary (empty on ranks > 0: rank 0 writes)."""
    try:
        for arm in arms:  # every arm trains the same initial student (same seed, same data order, same budget)
            folder = arm_folder(run_dir, arm)
            if is_model_folder(folder):
                console.print(f"[bold]{arm}[/bold]: already trained ({folder})")
                continue
            run.train_arm(arm, folder)
        if not distributed.is_main():  # the report is rank 0's, from the saved folders
            return {}
        rows = run.measure()
    finally:
        metrics.close()
    summary = write_summary(run_dir, {
        **head, "metrics": list(run.metrics), "arms": rows, **run.summary_fields(), "device": str(device),
        "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
    })
    summary = run.finish(summary)
    print_summary(summary, console)
    print_extras(summary, console)
    if report:
        console.print(f"report: {build_report(run_dir)}")
    return summary


def print_extras(summary: dict[str, Any], console: Console) -> None:
    """Per-exit, per-generation and EMA accuracies, which the summary table has no columns for."""
    for arm, values in summary["arms"].items():
        if "exit_accuracy" in values:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values["exit_accuracy"].items())
            console.print(f"{arm}: accuracy per exit (shallowest first): {shown}")
        if "generation_accuracy" in values:
            shown = ", ".join(f"gen {i} {v:.4f}" for i, v in enumerate(values["generation_accuracy"]))
            console.print(f"{arm}: accuracy per generation: {shown}")
        if "ema_accuracy" in values:
            console.print(f"{arm}: accuracy of the EMA teacher {values['ema_accuracy']:.4f}")
