import math

import pytest
import torch

from distil.config.schema import TrainSpec
from distil.train.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_then_schedule(schedule):
    spec = TrainSpec(steps=10, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, spec) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0)
    if schedule == "constant":
        assert factors[2:] == [1.0] * 8
    elif schedule == "linear":
        assert factors[6] == pytest.approx(0.1 + 0.9 * (1 - 4 / 8))
    else:
        assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(10, spec) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_scheduler_drives_the_optimizer_lr():
    spec = TrainSpec(steps=4, lr=0.1, schedule="linear", warmup_steps=0, optimizer="sgd")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(spec, [param])
    sched = build_scheduler(spec, opt)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025])
