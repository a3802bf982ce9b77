"""User-facing errors: the CLI prints their message on one line and exits with code 2, never a traceback."""

from __future__ import annotations


class DistilError(Exception):
    """A problem with the user's input (recipe, files, models, data), explained with how to fix it."""


class ConfigError(DistilError):
    """One or more problems in a recipe; each problem is one line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
