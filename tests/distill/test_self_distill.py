"""Self-distillation and multi-teacher objectives: EMA teacher (exact resume), deep supervision, teacher mixtures."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distil.data.stream import BatchStream
from distil.distill.multi_teacher import MultiTeacherObjective, TeacherMixture
from distil.distill.objectives import LogitLoss, soft_term
from distil.distill.pair import Teacher
from distil.distill.self_distill import DeepSupervisionObjective, EMAObjective, EMATeacher
from distil.errors import DistilError
from distil.losses import forward_kl
from distil.models.exits import build_exits, default_exits, exit_accuracies
from distil.models.vision import CNN, MLP
from distil.train.config import TrainConfig
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog

CPU = torch.device("cpu")
torch.manual_seed(0)
X = torch.randn(48, 1, 8, 8)
Y = torch.randint(0, 4, (48,))


def cnn(seed=1):
    torch.manual_seed(seed)
    return CNN((1, 8, 8), 4, [4, 6, 8], 16, dropout=0.2)


def stage(path, objective, spec):
    stream = BatchStream(len(Y), 8, lambda i: (X[i], Y[i]), seed=3)
    return Stage("arm", objective, stream, spec, path / "ckpt", MetricsLog(path / "m.jsonl", tensorboard=False), CPU)


def test_ema_update_follows_the_warmed_up_decay_and_averages_batchnorm_statistics():
    model = cnn()
    ema = EMATeacher(model, decay=0.9)
    old = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(X[:8])  # moves the batch-norm running statistics
    ema.update(model)
    d = min(0.9, 1 / 10)  # first update: (1 + 0) / (10 + 0)
    new = model.state_dict()
    for key, value in ema.model.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, d * old[key] + (1 - d) * new[key])
        else:
            assert torch.equal(value, new[key])
    assert int(ema.updates) == 1 and "updates" in ema.state_dict()
    ema.train()
    assert not ema.training and not ema.model.training
    assert all(not p.requires_grad for p in ema.parameters())


class Boom(Exception):
    pass


class CrashingEMA(EMAObjective):
    def __init__(self, *args, crash_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at = 0, crash_at

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Boom
        return super().loss(batch)


def test_ema_state_resumes_exactly(tmp_path, crash_at=6):  # call 6: step 3's second micro-batch; saved at step 2
    spec = TrainConfig(steps=4, grad_accum=2, lr=0.05, save_every=2, log_every=1)
    loss = LogitLoss(alpha=0.5, temperature=2.0)
    reference = cnn()
    ref_objective = EMAObjective(reference, loss, CPU, decay=0.8)
    train(stage(tmp_path / "ref", ref_objective, spec), show_progress=False)

    model = cnn()
    crashing = CrashingEMA(model, loss, CPU, decay=0.8, crash_at=crash_at)
    with pytest.raises(Boom):
        train(stage(tmp_path / "run", crashing, spec), show_progress=False)
    torch.manual_seed(123)
    resumed_model = cnn(seed=7)
    resumed = EMAObjective(resumed_model, loss, CPU, decay=0.8)
    train(stage(tmp_path / "run", resumed, spec), show_progress=False)
    for a, b in zip(ref_objective.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(reference.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert int(resumed.ema.updates) == 4  # once per optimizer step, not once per micro-batch
    assert not torch.equal(resumed.ema.model.features[0].weight, resumed_model.features[0].weight)


def test_default_exits_and_single_block_models():
    assert default_exits(cnn()) == ["features.3", "features.7"]  # 8x8 input: blocks 1 and 2 pool, block 3 does not
    assert default_exits(MLP((4,), 3, [8, 8, 8])) == ["2", "4"]
    with pytest.raises(DistilError, match="single block"):
        build_exits(MLP((4,), 3, [8]), torch.randn(2, 4), 3)


def test_deep_supervision_loss_matches_the_formula_and_exits_stay_out_of_the_student():
    model = cnn().eval()  # no dropout: the hand computation below must see the same forward
    exits = build_exits(model, X[:2], 4)
    objective = DeepSupervisionObjective(model, exits, CPU, alpha=0.4, temperature=2.0, feature_weight=0.1)
    x, y = X[:8], Y[:8]
    terms = objective.loss((x, y))

    logits = model(x)
    deepest = model.head[:4](model.features(x)).detach()
    expected = F.cross_entropy(logits, y)
    maps = [model.features[:4](x), model.features[:8](x)]
    for fmap, head in zip(maps, exits.heads):
        features, exit_logits = head(fmap)
        expected = expected + 0.6 * F.cross_entropy(exit_logits, y)
        expected = expected + 0.4 * 4.0 * forward_kl(exit_logits, logits.detach(), temperature=2.0)
        expected = expected + 0.1 * (features - deepest).pow(2).mean()
    torch.testing.assert_close(terms["loss"], expected)
    terms["loss"].backward()
    assert all(p.grad is not None for p in exits.parameters())
    assert not any(key.startswith(("heads", "exits")) for key in model.state_dict())
    accuracies = exit_accuracies(model, exits, X, Y, CPU)
    assert list(accuracies) == ["features.3", "features.7", "output"]
    assert accuracies["output"] == float((model(X).argmax(-1) == Y).float().mean())


def test_teacher_mixture_is_the_weighted_average_of_softened_distributions():
    teachers = [nn.Linear(5, 3), nn.Linear(5, 3)]
    x = torch.randn(4, 5)
    mix = TeacherMixture(teachers, [3.0, 1.0], temperature=2.0)
    expected = 0.75 * (teachers[0](x) / 2).softmax(-1) + 0.25 * (teachers[1](x) / 2).softmax(-1)
    torch.testing.assert_close((mix(x) / 2).softmax(-1), expected)


def test_per_teacher_objective_sums_weighted_soft_terms():
    torch.manual_seed(0)
    student, teachers = nn.Linear(5, 3), [Teacher(nn.Linear(5, 3)), Teacher(nn.Linear(5, 3))]
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    spec = LogitLoss(alpha=0.6, temperature=3.0)
    terms = MultiTeacherObjective(student, teachers, [1.0, 3.0], spec, CPU).loss((x, y))
    kd = 0.25 * soft_term(student(x), teachers[0](x), y, spec) + 0.75 * soft_term(student(x), teachers[1](x), y, spec)
    torch.testing.assert_close(terms["kd"], kd)
    torch.testing.assert_close(terms["loss"], 0.6 * kd + 0.4 * F.cross_entropy(student(x), y))
    assert {"kd_teacher0", "kd_teacher1", "ce"} <= set(terms)
