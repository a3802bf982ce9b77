"""The tasks distil distils for: recipe `task:` name -> its Task (see distil.tasks.base). A new task is one module
here and one entry in TASKS."""

from __future__ import annotations

from distil.errors import DistilError
from distil.tasks.base import RunContext, Task, TaskRun
from distil.tasks.causal_lm import CAUSAL_LM
from distil.tasks.classification import CLASSIFICATION
from distil.tasks.embedding import EMBEDDING

TASKS: dict[str, Task] = {"classification": CLASSIFICATION, "causal_lm": CAUSAL_LM, "embedding": EMBEDDING}

__all__ = ["TASKS", "RunContext", "Task", "TaskRun", "task_of"]


def task_of(name: str) -> Task:
    if name not in TASKS:
        raise DistilError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
