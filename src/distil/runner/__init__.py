"""Running recipes: a fresh run, a resumed run, and the pre-flight checks behind `distil validate`.

Every task runs through the same arm loop (`distil.runner.run.run_task`); what differs per task is in distil.tasks."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console

from distil import runlock
from distil.config.load import recipe_to_yaml, validate_recipe
from distil.config.schema import Recipe
from distil.diskspace import DiskFullError
from distil.errors import ConfigError, DistilError
from distil.estimate import memory_problems
from distil.precision import describe_precision
from distil.runner.run import run_task
from distil.tasks import task_of
from distil.train import distributed
from distil.train.signals import StopRequested, stop_signals

RECIPE_FILE = "recipe.yaml"


def problems(recipe: Recipe) -> list[str]:
    """Everything that can be checked before loading data or models, one line per problem."""
    return task_of(recipe.task).problems(recipe) + memory_problems(recipe)


def check(recipe: Recipe) -> list[str]:
    """All pre-flight checks `distil validate` runs: the cheap ones, then loading data and building the models."""
    return problems(recipe) or task_of(recipe.task).deep_problems(recipe)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_recipe(recipe: Recipe, *, show_progress: bool = True, console: Console | None = None) -> dict:
    """Start a new run in `recipe.output_dir` (refusing to overwrite another run's directory).

    Under torchrun every process calls this: they join one process group and rank 0 alone creates the directory."""
    distributed.init_from_env(recipe.train.device)
    found = problems(recipe)
    if found:
        raise ConfigError(found)
    run_dir = distributed.on_main(_start, recipe)
    if distributed.is_main():
        (console or Console()).print(f"run directory: {run_dir}\n{describe_precision(recipe)}", highlight=False)
    return _run(recipe.model_copy(update={"output_dir": str(run_dir)}), run_dir, show_progress, console)


def _start(recipe: Recipe) -> Path:
    run_dir = Path(recipe.output_dir) if recipe.output_dir else default_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    runlock.acquire(run_dir)  # first: a run still going in this folder is named as such, not as one to resume
    try:
        if (run_dir / RECIPE_FILE).exists():
            raise DistilError(f"{run_dir} already holds a run; continue it with `distil resume {run_dir}` "
                              "or choose another output_dir=PATH")
        recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
        tmp = run_dir / f".{RECIPE_FILE}.tmp"  # written whole or not at all: a killed start leaves no half recipe
        tmp.write_text(recipe_to_yaml(recipe))
        os.replace(tmp, run_dir / RECIPE_FILE)
    except BaseException:
        runlock.release(run_dir)
        raise
    return run_dir


def resume_run(run_dir: Path, *, show_progress: bool = True, console: Console | None = None) -> dict:
    """Continue an interrupted run from its newest intact checkpoints (finished stages are not redone)."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise DistilError(f"{run_dir} is not a run directory (no {RECIPE_FILE}); start one with `distil run`")
    recipe = validate_recipe(yaml.safe_load(path.read_text()))
    distributed.init_from_env(recipe.train.device)
    distributed.on_main(runlock.acquire, Path(run_dir))
    return _run(recipe, Path(run_dir), show_progress, console)


def _run(recipe: Recipe, run_dir: Path, show_progress: bool, console: Console | None) -> dict:
    if not distributed.is_main():  # one log: rank 0 speaks for the job
        console, show_progress = Console(quiet=True), False
    # One stop listener for the whole run: a SIGTERM or Ctrl-C between stages stops before the next stage starts.
    with stop_signals():
        try:
            summary = run_task(recipe, run_dir, show_progress=show_progress, console=console)
        except (StopRequested, KeyboardInterrupt, DiskFullError) as exc:  # the CLI's message says which to resume
            exc.run_dir = run_dir  # type: ignore[union-attr]
            if isinstance(exc, StopRequested):  # every rank stopped after the same step
                distributed.shutdown()
            raise
        finally:
            runlock.release(run_dir)
    distributed.shutdown()  # ranks > 0 wait here while rank 0 writes the report
    return summary
