"""The loop's invariances: accumulation, exact resume after a crash, the non-finite guard, graceful stop."""

import json
import os
import signal

import pytest
import torch
from torch import nn

from distil.config.schema import LossSpec, TrainSpec
from distil.data.stream import BatchStream
from distil.distill.objectives import ClassifierObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.train.loop import Stage, train
from distil.train.metrics import TIMING_KEYS, MetricsLog
from distil.train.signals import StopRequested

torch.manual_seed(0)
X = torch.randn(64, 12)
Y = torch.randint(0, 5, (64,))
TEACHER = Teacher(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)))


def student(seed=1, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 5))


class Boom(Exception):
    pass


class CrashingObjective(ClassifierObjective):
    """Raises on the n-th call: a crash in the middle of a run."""

    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at = 0, crash_at

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Boom
        return super().loss(batch)


def make_stage(tmp_path, model, spec, *, batch_size, objective=None, name="arm", loss=None):
    stream = BatchStream(len(Y), batch_size, lambda i: (X[i], Y[i]), seed=3)
    objective = objective or ClassifierObjective(model, TEACHER, loss or LossSpec(alpha=0.7, temperature=3.0),
                                                 torch.device("cpu"))
    return Stage(name, objective, stream, spec, tmp_path / "ckpt", MetricsLog(tmp_path / "metrics.jsonl",
                 tensorboard=False), torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulating_4_by_2_equals_one_batch_of_8(tmp_path, optimizer):
    spec = dict(steps=3, optimizer=optimizer, lr=0.05, clip_grad_norm=None, schedule="constant", precision="fp32")  # exact sums: no bf16
    big, small = student(), student()
    train(make_stage(tmp_path / "a", big, TrainSpec(batch_size=8, **spec), batch_size=8), show_progress=False)
    train(make_stage(tmp_path / "b", small, TrainSpec(batch_size=2, grad_accum=4, **spec), batch_size=2),
          show_progress=False)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big[0].weight, student()[0].weight)  # it did train


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("crash_at", [3, 6, 8])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, crash_at):
    spec = TrainSpec(steps=8, batch_size=8, lr=0.02, save_every=2, log_every=1, warmup_steps=2, keep_checkpoints=2)
    reference = student(dropout=0.3)  # dropout: the RNG state must be restored too
    train(make_stage(tmp_path / "ref", reference, spec, batch_size=8), show_progress=False)

    model = student(dropout=0.3)
    crashing = CrashingObjective(model, TEACHER, LossSpec(alpha=0.7, temperature=3.0), torch.device("cpu"),
                                 crash_at=crash_at)
    with pytest.raises(Boom):
        train(make_stage(tmp_path / "run", model, spec, batch_size=8, objective=crashing), show_progress=False)
    torch.manual_seed(12345)  # a resumed process starts from different RNG state; the checkpoint must restore it
    resumed = student(seed=99, dropout=0.3)  # and from different weights
    train(make_stage(tmp_path / "run", resumed, spec, batch_size=8), show_progress=False)

    for p, q in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    ref_log = MetricsLog(tmp_path / "ref" / "metrics.jsonl").read()
    run_log = MetricsLog(tmp_path / "run" / "metrics.jsonl").read()
    assert _strip_timing(ref_log) == _strip_timing(run_log)


class NaNObjective(ClassifierObjective):
    def __init__(self, *args, bad_calls, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.bad_calls = 0, bad_calls

    def loss(self, batch):
        self.calls += 1
        terms = super().loss(batch)
        if self.calls in self.bad_calls:
            terms["kd"] = terms["kd"] * float("nan")
            terms["loss"] = terms["loss"] + terms["kd"]
        return terms


def test_non_finite_loss_stops_naming_step_and_term(tmp_path):
    model = student()
    objective = NaNObjective(model, TEACHER, LossSpec(), torch.device("cpu"), bad_calls={4})
    spec = TrainSpec(steps=6, batch_size=8, save_every=2)
    with pytest.raises(DistilError, match=r"non-finite loss .* at step 4; last good checkpoint: .*step-00000002"):
        train(make_stage(tmp_path, model, spec, batch_size=8, objective=objective), show_progress=False)


def test_non_finite_steps_can_be_skipped(tmp_path):
    model = student()
    objective = NaNObjective(model, TEACHER, LossSpec(), torch.device("cpu"), bad_calls={2, 5})
    spec = TrainSpec(steps=6, batch_size=8, max_nonfinite_skips=1)
    train(make_stage(tmp_path, model, spec, batch_size=8, objective=objective), show_progress=False)
    records = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert [r["skipped_nonfinite"] for r in records if "skipped_nonfinite" in r] == ["loss", "loss"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path):
    class SignalAtThirdStep(ClassifierObjective):
        calls = 0

        def loss(self, batch):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().loss(batch)

    model = student()
    objective = SignalAtThirdStep(model, TEACHER, LossSpec(), torch.device("cpu"))
    with pytest.raises(StopRequested) as info:
        train(make_stage(tmp_path, model, TrainSpec(steps=10, batch_size=8), batch_size=8, objective=objective),
              show_progress=False)
    assert info.value.step == 3 and info.value.checkpoint.name == "step-00000003"
    state = json.loads((info.value.checkpoint / "state.json").read_text())
    assert state["step"] == 3


def test_teacher_gets_no_gradient_and_stays_in_eval(tmp_path):
    model = student()
    container = nn.ModuleDict({"student": model, "teacher": TEACHER})
    container.train()
    assert not TEACHER.training and not TEACHER.model.training
    train(make_stage(tmp_path, model, TrainSpec(steps=2, batch_size=8), batch_size=8), show_progress=False)
    assert all(p.grad is None and not p.requires_grad for p in TEACHER.parameters())
    assert not TEACHER.training and not TEACHER.model.training
