"""Logit losses: pinned to hand-written references, gradients in float64, and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.losses.logits import (
    distillation_loss,
    dkd,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from distil.losses.registry import DIVERGENCES

# ------------------------------------------------------------------------ independent references (numpy, loops)


def _softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


REFERENCES = {
    "forward_kl": lambda ps, pt, prm: _kl(pt, ps),
    "reverse_kl": lambda ps, pt, prm: _kl(ps, pt),
    "generalized_jsd": lambda ps, pt, prm: (
        prm["beta"] * _kl(pt, prm["beta"] * pt + (1 - prm["beta"]) * ps)
        + (1 - prm["beta"]) * _kl(ps, prm["beta"] * pt + (1 - prm["beta"]) * ps)
    ),
    "skew_kl": lambda ps, pt, prm: _kl(pt, prm["alpha"] * pt + (1 - prm["alpha"]) * ps),
    "skew_reverse_kl": lambda ps, pt, prm: _kl(ps, prm["alpha"] * ps + (1 - prm["alpha"]) * pt),
    "tvd": lambda ps, pt, prm: 0.5 * float(sum(abs(a - b) for a, b in zip(pt, ps))),
}
PARAMS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
NAMES = list(REFERENCES)


def _reference(name, s, t, temperature=1.0, mask=None, reduction="mean"):
    s2, t2 = s.double().reshape(-1, s.shape[-1]).numpy(), t.double().reshape(-1, t.shape[-1]).numpy()
    keep = np.ones(len(s2), bool) if mask is None else mask.reshape(-1).numpy()
    values = [
        REFERENCES[name](_softmax(s2[i], temperature), _softmax(t2[i], temperature), PARAMS.get(name, {}))
        if keep[i] else 0.0
        for i in range(len(s2))
    ]
    if reduction == "none":
        return torch.tensor(values, dtype=torch.float64).reshape(s.shape[:-1])
    total = sum(values)
    return total / max(int(keep.sum()), 1) if reduction == "mean" else total


def _pair(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=dtype) * scale
    return s, torch.randn(*shape, generator=g, dtype=dtype) * scale


def _call(name, s, t, **kw):
    return DIVERGENCES[name](s, t, **PARAMS.get(name, {}), **kw)


# ------------------------------------------------------------------------------------------------ pinned values
def test_two_class_values_derived_by_hand():
    # p_teacher = [1/2, 1/2], p_student = [1/4, 3/4]
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])
    assert forward_kl(s, t).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert reverse_kl(s, t).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    m = (0.375, 0.625)  # beta = 0.5 mixture
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert generalized_jsd(s, t, beta=0.5).item() == pytest.approx(jsd, abs=1e-6)
    m = (0.1 * 0.5 + 0.9 * 0.25, 0.1 * 0.5 + 0.9 * 0.75)  # skew mixture, alpha = 0.1
    assert skew_kl(s, t, alpha=0.1).item() == pytest.approx(0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    m = (0.1 * 0.25 + 0.9 * 0.5, 0.1 * 0.75 + 0.9 * 0.5)
    assert skew_reverse_kl(s, t, alpha=0.1).item() == pytest.approx(
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert tvd(s, t).item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_matches_reference(name, temperature):
    s, t = _pair(2, 3, 7)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for reduction in ("mean", "sum", "none"):
        for m in (None, mask):
            got = _call(name, s, t, temperature=temperature, mask=m, reduction=reduction)
            want = _reference(name, s, t, temperature, m, reduction)
            torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_forward_kl_matches_torch_kl_div_batchmean():
    s, t = _pair(6, 11, dtype=torch.float32)
    want = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean")
    torch.testing.assert_close(forward_kl(s, t, temperature=2.0), want)


def _dkd_reference(s, t, labels, alpha, beta, temperature, ignore_index=-100):
    total, count = 0.0, 0
    rows_s, rows_t = s.reshape(-1, s.shape[-1]).numpy(), t.reshape(-1, t.shape[-1]).numpy()
    for srow, trow, y in zip(rows_s, rows_t, labels.reshape(-1)):
        if int(y) == ignore_index:
            continue
        ps, pt = _softmax(srow, temperature), _softmax(trow, temperature)
        y = int(y)
        tckd = _kl(np.array([pt[y], 1 - pt[y]]), np.array([ps[y], 1 - ps[y]]))
        rest_s, rest_t = np.delete(ps, y), np.delete(pt, y)
        nckd = _kl(rest_t / rest_t.sum(), rest_s / rest_s.sum())
        total += temperature**2 * (alpha * tckd + beta * nckd)
        count += 1
    return total / max(count, 1)


def test_dkd_matches_reference():
    s, t = _pair(2, 4, 6, seed=3)
    labels = torch.tensor([[0, 5, -100, 2], [-100, 1, 1, 4]])
    got = dkd(s, t, labels, alpha=1.5, beta=8.0, temperature=4.0)
    assert got.item() == pytest.approx(_dkd_reference(s, t, labels, 1.5, 8.0, 4.0), rel=1e-10)
    got = dkd(s, t, labels, alpha=1.0, beta=0.5, temperature=1.0)
    assert got.item() == pytest.approx(_dkd_reference(s, t, labels, 1.0, 0.5, 1.0), rel=1e-10)


def test_dkd_tckd_plus_nckd_decomposes_forward_kl():
    # Paper, eq. 1: KL = TCKD + (1 - p_t(target)) * NCKD per sample; with beta weighting that factor it must agree.
    s, t = _pair(1, 5, seed=4)
    labels = torch.tensor([2])
    pt_target = F.softmax(t / 2, -1)[0, 2].item()
    got = dkd(s, t, labels, alpha=1.0, beta=1 - pt_target, temperature=2.0) / 4.0
    assert got.item() == pytest.approx(forward_kl(s, t, temperature=2.0).item(), rel=1e-10)


def _classic_reference(s, t, labels, alpha, temperature):
    kls, ces = [], []
    for srow, trow, y in zip(s.numpy(), t.numpy(), labels):
        if int(y) == -100:
            continue
        kls.append(_kl(_softmax(trow, temperature), _softmax(srow, temperature)))
        ces.append(-math.log(_softmax(srow, 1.0)[int(y)]))
    return alpha * temperature**2 * sum(kls) / len(kls) + (1 - alpha) * sum(ces) / len(ces)


def test_distillation_loss_matches_reference():
    s, t = _pair(5, 4, seed=5)
    labels = torch.tensor([0, 3, -100, 1, 2])
    for alpha, temperature in [(0.5, 2.0), (0.9, 4.0), (0.1, 1.0)]:
        got = distillation_loss(s, t, labels, alpha=alpha, temperature=temperature)
        assert got.item() == pytest.approx(_classic_reference(s, t, labels, alpha, temperature), rel=1e-10)


def test_distillation_loss_limits():
    s, t = _pair(3, 5, 6, seed=6, dtype=torch.float32)
    labels = torch.randint(0, 6, (3, 5), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    keep = labels != -100
    soft = distillation_loss(s, t, labels, alpha=1.0, temperature=3.0)
    torch.testing.assert_close(soft, 9.0 * forward_kl(s, t, temperature=3.0, mask=keep))
    hard = distillation_loss(s, t, labels, alpha=0.0, temperature=3.0)
    torch.testing.assert_close(hard, F.cross_entropy(s.reshape(-1, 6), labels.reshape(-1)))


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    s, t = _pair(2, 3, 5, seed=7)
    s.requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: _call(name, x, t, temperature=1.7, mask=mask, reduction=reduction), (s,)
        )


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gradcheck_jsd_limits(beta):
    s, t = _pair(3, 4, seed=8)
    assert torch.autograd.gradcheck(lambda x: generalized_jsd(x, t, beta=beta), (s.requires_grad_(True),))


def test_gradcheck_dkd_and_classic():
    s, t = _pair(4, 5, seed=9)
    labels = torch.tensor([1, -100, 4, 0])
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dkd(x, t, labels, alpha=1.0, beta=2.0, temperature=2.0), (s,))
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, t, labels, alpha=0.3, temperature=2.0), (s,))


@pytest.mark.parametrize("name", NAMES)
def test_teacher_gets_no_gradient(name):
    s, t = _pair(3, 6, seed=10, dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    _call(name, s, t, temperature=2.0).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_teacher_gets_no_gradient_dkd_and_classic():
    s, t = _pair(3, 6, seed=11, dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    labels = torch.tensor([0, 2, 5])
    (dkd(s, t, labels) + distillation_loss(s, t, labels)).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_and_non_negative(name):
    s, _ = _pair(4, 9, seed=12)
    assert abs(_call(name, s, s.clone()).item()) < 1e-12
    for seed in range(5):
        s, t = _pair(4, 9, seed=seed, scale=0.1 + 3 * seed)
        assert (_call(name, s, t, reduction="none") >= -1e-12).all()


@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_constant_shift(name):
    s, t = _pair(2, 3, 8, seed=13)
    shift_s, shift_t = _pair(2, 3, 1, seed=14, scale=50.0)
    shifted = _call(name, s + shift_s, t + shift_t, temperature=1.5)
    torch.testing.assert_close(shifted, _call(name, s, t, temperature=1.5))


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_have_no_effect(name):
    s, t = _pair(2, 4, 6, seed=15, dtype=torch.float32)
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = torch.tensor([1e4, float("nan"), -float("inf"), 0, 0, 0])
    t2[~mask] = float("nan")
    grads = []
    for x, y in [(s, t), (s2, t2)]:
        x = x.clone().requires_grad_(True)
        val = _call(name, x, y, mask=mask)
        val.backward()
        grads.append((val.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert (grads[1][1][~mask] == 0).all()


def test_jsd_limits_and_convention():
    s, t = _pair(3, 7, seed=16)
    assert torch.equal(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # The interior behaves like beta * forward KL near 0 and (1 - beta) * reverse KL near 1 (TRL / GKD convention).
    eps = 1e-6
    assert (generalized_jsd(s, t, beta=eps) / eps).item() == pytest.approx(forward_kl(s, t).item(), rel=1e-4)
    assert (generalized_jsd(s, t, beta=1 - eps) / eps).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-4)
    for beta in (0.0, 1e-9, 0.5, 1 - 1e-9, 1.0):
        assert torch.isfinite(generalized_jsd(s, t, beta=beta))


def test_skew_limits():
    s, t = _pair(3, 7, seed=17)
    assert torch.equal(skew_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert skew_kl(s, t, alpha=1.0).item() == 0.0
    assert skew_reverse_kl(s, t, alpha=1.0).item() == 0.0
    # Skewing towards the distribution itself shrinks the divergence monotonically.
    values = [skew_kl(s, t, alpha=a).item() for a in (0.0, 0.1, 0.5, 0.9)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_scales_logits(name):
    s, t = _pair(2, 6, seed=18)
    torch.testing.assert_close(_call(name, s * 3, t * 3, temperature=3.0), _call(name, s, t))
    # High temperature flattens both distributions: the divergence vanishes (like 1/T^2 for the KLs, 1/T for TVD).
    high, higher = _call(name, s, t, temperature=1e2).item(), _call(name, s, t, temperature=1e4).item()
    assert 0 < higher < high * 0.02 and higher < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_logits_are_finite(name):
    s, t = _pair(2, 6, seed=19, dtype=torch.float32)
    # Entry 0 excluded by both: the same as removing it from the vocabulary.
    s_both, t_both = s.clone(), t.clone()
    s_both[:, 0] = -float("inf")
    t_both[:, 0] = -float("inf")
    x = s_both.clone().requires_grad_(True)
    val = _call(name, x, t_both, temperature=2.0)
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(x.grad).all() and (x.grad[:, 0] == 0).all()
    torch.testing.assert_close(val, _call(name, s[:, 1:], t[:, 1:], temperature=2.0))
    # Excluded by only one of the two (teacher, then student): finite value and gradient.
    for only_t in (True, False):
        s1, t1 = s.clone(), t.clone()
        (t1 if only_t else s1)[:, 2] = -float("inf")
        x = s1.clone().requires_grad_(True)
        val = _call(name, x, t1)
        val.backward()
        assert torch.isfinite(val) and torch.isfinite(x.grad).all()


def test_neg_inf_logits_dkd_and_classic():
    s, t = _pair(3, 6, seed=20, dtype=torch.float32)
    s[:, 4] = -float("inf")
    t[:, 4] = -float("inf")
    t[:, 5] = -float("inf")
    labels = torch.tensor([0, 1, 3])
    x = s.clone().requires_grad_(True)
    (dkd(x, t, labels) + distillation_loss(x, t, labels)).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero_and_zero_grad(name):
    s, t = _pair(2, 3, 5, seed=21, dtype=torch.float32)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        x = s.clone().requires_grad_(True)
        val = _call(name, x, t, mask=mask, reduction=reduction)
        val.sum().backward()
        assert (val == 0).all() and torch.equal(x.grad, torch.zeros_like(s))


def test_all_ignored_labels_give_zero_and_zero_grad():
    s, t = _pair(4, 5, seed=22, dtype=torch.float32)
    labels = torch.full((4,), -100)
    for fn in (dkd, distillation_loss):
        x = s.clone().requires_grad_(True)
        val = fn(x, t, labels)
        val.backward()
        assert val.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(name, dtype):
    s, t = _pair(4, 8, 64, seed=23, dtype=torch.float32)
    s_low, t_low = s.to(dtype), t.to(dtype)
    got = _call(name, s_low, t_low, temperature=2.0)
    assert got.dtype == torch.float32
    # Same as the fp32 computation on the rounded inputs, and close to the unrounded one.
    torch.testing.assert_close(got, _call(name, s_low.float(), t_low.float(), temperature=2.0))
    torch.testing.assert_close(got, _call(name, s, t, temperature=2.0), rtol=0.05, atol=2e-3)
    x = s_low.clone().requires_grad_(True)
    _call(name, x, t_low).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_fp64_stays_fp64_and_reduction_none_shape():
    s, t = _pair(2, 3, 4, seed=24)
    out = forward_kl(s, t, reduction="none")
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    torch.testing.assert_close(out.sum(), forward_kl(s, t, reduction="sum"))
    assert forward_kl(s.float(), t.float()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_distil_error():
    s, t = _pair(2, 5)
    with pytest.raises(DistilError, match="differ in shape"):
        forward_kl(s, t[:, :4])
    with pytest.raises(DistilError, match="temperature"):
        forward_kl(s, t, temperature=0.0)
    with pytest.raises(DistilError, match="beta"):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(DistilError, match="alpha"):
        skew_kl(s, t, alpha=-0.1)
    with pytest.raises(DistilError, match="mask"):
        forward_kl(s, t, mask=torch.ones(2))
    with pytest.raises(DistilError, match="reduction"):
        tvd(s, t, reduction="batchmean")
    with pytest.raises(DistilError, match="labels must lie"):
        dkd(s, t, torch.tensor([0, 5]))
    with pytest.raises(DistilError, match="alpha"):
        distillation_loss(s, t, torch.tensor([0, 1]), alpha=2.0)
    with pytest.raises(DistilError, match="do not match"):
        distillation_loss(s, t, torch.tensor([0, 1, 2]))
