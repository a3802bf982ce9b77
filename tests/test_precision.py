"""`precision: auto` picks bf16 only where the device runs it natively, and a run records what was chosen."""

from __future__ import annotations

import warnings

import pytest
import torch

from distil import precision
from distil.config.load import load_recipe
from distil.train.loop import Stage, train


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU does (True) or does not (False) run bf16 natively."""
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "bf16_native", lambda kind: value)
    return set_native


def test_auto_picks_fp32_without_native_bf16(native):
    native(False)
    recipe = load_recipe("smollm2-distil")
    assert (recipe.train.precision, recipe.teacher.model.dtype) == ("fp32", "float32")
    assert "precision: fp32, teacher float32 (bf16 is not native on this CPU)" == precision.describe_precision(recipe)


def test_auto_picks_bf16_where_native(native):
    native(True)
    recipe = load_recipe("smollm2-distil")
    assert (recipe.train.precision, recipe.teacher.model.dtype) == ("bf16", "bfloat16")
    digits = load_recipe("digits-kd")  # the teacher stage's own budget resolves too
    assert (digits.train.precision, digits.teacher.train.precision) == ("bf16", "bf16")


def test_auto_teacher_follows_an_explicit_student_precision(native):
    native(True)
    recipe = load_recipe("smollm2-distil", ["train.precision=fp32"])
    assert recipe.teacher.model.dtype == "float32"


def test_explicit_bf16_without_native_support_warns_once_and_is_kept(native):
    native(False)
    with pytest.warns(UserWarning, match=r"train.precision asks for bf16, which this CPU does not run natively") as seen:
        recipe = load_recipe("smollm2-distil", ["train.precision=bf16"])
    assert len(seen) == 1 and recipe.train.precision == "bf16" and recipe.teacher.model.dtype == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say where bf16 is native
        native(True)
        load_recipe("smollm2-distil", ["train.precision=bf16"])


def test_resolved_recipe_is_what_a_resume_reads(native, tmp_path):
    """recipe.yaml holds the chosen values, so a run resumed on another machine keeps its precision."""
    from distil.config.load import recipe_to_yaml, validate_recipe
    import yaml

    native(True)
    written = recipe_to_yaml(load_recipe("smollm2-distil"))
    native(False)
    with pytest.warns(UserWarning, match="does not run natively"):  # recorded bf16 on a machine without it
        resumed = validate_recipe(yaml.safe_load(written))
    assert resumed.train.precision == "bf16"


def test_real_detection_matches_onednn():
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert precision.bf16_native("cpu") is bool(expected)
    assert precision.train_precision("auto", "cpu") == ("bf16" if expected else "fp32")


def test_the_loop_autocasts_only_what_auto_resolves_to(native, tmp_path):
    """A Python user's TrainSpec(precision="auto") reaches the loop unresolved: the loop resolves it itself."""
    from torch import nn

    from distil.config.schema import TrainSpec
    from distil.data.stream import BatchStream
    from distil.train.metrics import MetricsLog
    from distil.train.objective import Objective

    seen: list[torch.dtype] = []

    class Probe(Objective):
        unit = "samples"

        def __init__(self) -> None:
            self.net = nn.Linear(4, 2)
            self.modules = {"student": self.net}

        def loss(self, batch):
            out = self.net(batch[0])
            seen.append(out.dtype)
            return {"loss": out.float().pow(2).mean()}

        def weight(self, batch):
            return len(batch[0])

    data = torch.randn(8, 4)
    for value, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        native(value)
        seen.clear()
        stream = BatchStream(len(data), 4, lambda indices: (data[indices],), seed=0)
        stage = Stage(f"probe-{value}", Probe(), stream, TrainSpec(steps=1, log_every=1), tmp_path / str(value),
                      MetricsLog(tmp_path / f"{value}.jsonl", tensorboard=False), torch.device("cpu"))
        train(stage, show_progress=False)
        assert seen == [dtype]
