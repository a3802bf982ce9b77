"""Runs shared by the report and export tests: one tiny real digits-kd run, one hand-made tiny-Llama run."""

from __future__ import annotations

import pytest
from rich.console import Console

from lm_run import make_lm_run

# A few steps of the real recipe: enough for every curve, evaluation and measurement to exist, in seconds.
TINY_DIGITS = ["teacher.train.steps=30", "teacher.train.log_every=5", "train.steps=20", "train.log_every=5",
               "train.eval_every=10", "latency_runs=3"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    pytest.importorskip("sklearn", reason="digits-kd needs scikit-learn (pip install 'distil[classic]')")
    from distil.config.load import load_recipe
    from distil.runner import run_recipe

    root = tmp_path_factory.mktemp("digits")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CACHE", str(root / "cache"))
        recipe = load_recipe("digits-kd", TINY_DIGITS + [f"output_dir={run_dir}"])
        run_recipe(recipe, show_progress=False, console=Console(quiet=True))
    return run_dir


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_lm_run(tmp_path_factory.mktemp("lm"))
