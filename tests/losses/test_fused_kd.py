"""KD + CE in one chunked pass equals the two fused losses (and so the plain path), in value and gradient."""

from __future__ import annotations

import pytest
import torch

from distil.errors import DistilError
from distil.losses import fused_linear_cross_entropy, fused_linear_divergence
from distil.losses.fused_kd import fused_linear_kd_and_ce

CASES = [("forward_kl", {}, 1.0), ("forward_kl", {}, 2.0), ("reverse_kl", {}, 1.5), ("jsd", {"beta": 0.3}, 1.0),
         ("skew_kl", {"alpha": 0.2}, 2.0), ("tvd", {}, 1.0)]


def heads(dtype=torch.float32, vs=37, vt=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s, w_s = torch.randn(2, 11, 8, generator=g, dtype=dtype), torch.randn(vs, 8, generator=g, dtype=dtype)
    h_t, w_t = torch.randn(2, 11, 6, generator=g, dtype=dtype), torch.randn(vt, 6, generator=g, dtype=dtype)
    labels = torch.randint(0, min(vs, vt), (2, 11), generator=g)
    labels[0, :4] = -100  # a prompt
    return h_s, w_s, h_t, w_t, labels


def reference(h_s, w_s, h_t, w_t, labels, kd_weight, ce_weight, divergence, temperature, params, vocab_size=None):
    """The two separate fused losses (each pinned to the plain path by tests/losses/test_fused.py)."""
    kd = fused_linear_divergence(h_s, w_s, h_t, w_t, divergence=divergence, temperature=temperature,
                                 mask=labels != -100, chunk_size=5, vocab_size=vocab_size, **params)
    ce = fused_linear_cross_entropy(h_s, w_s, labels, chunk_size=5)
    return kd_weight * kd + ce_weight * ce, kd, ce


def close_as_the_reference(ours, ref, exact):
    """fp32 results as close to the fp64 truth as the reference's own fp32 results (at most 4x its largest error,
    plus a few ulps of the largest entry): the one-pass and two-pass forms round differently, and a fixed tolerance
    would only record one machine's rounding."""
    for o, r, e in zip(ours, ref, exact):
        ours_error, ref_error = float((o.double() - e).abs().max()), float((r.double() - e).abs().max())
        assert ours_error <= 4 * ref_error + 8 * torch.finfo(torch.float32).eps * float(e.abs().max()), \
            (ours_error, ref_error)


def both(fn, h_s, w_s, *rest, **kw):
    hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, kd, ce = fn(hs, ws, *rest, **kw)
    loss.backward()
    return loss.detach(), kd.detach(), ce.detach(), hs.grad, ws.grad


@pytest.mark.parametrize("divergence,params,temperature", CASES)
@pytest.mark.parametrize("weights", [(0.5 * 4, 0.5), (1.0, 0.0), (0.0, 1.0)], ids=["both", "kd-only", "ce-only"])
def test_equals_the_two_separate_losses(divergence, params, temperature, weights, row_blocks):
    h_s, w_s, h_t, w_t, labels = heads()
    kd_w, ce_w = weights
    ours = both(lambda hs, ws: fused_linear_kd_and_ce(hs, ws, h_t, w_t, labels, kd_weight=kd_w, ce_weight=ce_w,
                                                      divergence=divergence, temperature=temperature, chunk_size=4,
                                                      **params), h_s, w_s)
    ref = both(lambda hs, ws: reference(hs, ws, h_t, w_t, labels, kd_w, ce_w, divergence, temperature, params),
               h_s, w_s)
    wide = [t.double() if t.is_floating_point() else t for t in (h_s, w_s, h_t, w_t, labels)]
    exact = both(lambda hs, ws: reference(hs, ws, *wide[2:], kd_w, ce_w, divergence, temperature, params), *wide[:2])
    ours64 = both(lambda hs, ws: fused_linear_kd_and_ce(hs, ws, *wide[2:], kd_weight=kd_w, ce_weight=ce_w,
                                                        divergence=divergence, temperature=temperature, chunk_size=4,
                                                        **params), *wide[:2])
    for a, b in zip(ours64, exact):  # the same formulas: equal to fp64 rounding
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    close_as_the_reference(ours, ref, exact)


def test_padded_student_head_trains_its_extra_rows_by_ce_only(row_blocks):
    """Student head 40 rows, teacher 37: the divergence runs over the shared 37, the CE over all 40."""
    h_s, w_s, h_t, w_t, labels = heads(vs=40, vt=37)
    ours = both(lambda hs, ws: fused_linear_kd_and_ce(hs, ws, h_t, w_t, labels, kd_weight=1.5, ce_weight=0.5,
                                                      vocab_size=37, chunk_size=3), h_s, w_s)
    ref = both(lambda hs, ws: reference(hs, ws, h_t, w_t, labels, 1.5, 0.5, "forward_kl", 1.0, {}, vocab_size=37),
               h_s, w_s)
    wide = [t.double() if t.is_floating_point() else t for t in (h_s, w_s, h_t, w_t, labels)]
    exact = both(lambda hs, ws: reference(hs, ws, *wide[2:], 1.5, 0.5, "forward_kl", 1.0, {}, vocab_size=37),
                 *wide[:2])
    close_as_the_reference(ours, ref, exact)


@pytest.mark.parametrize("divergence,temperature", [("jsd", 2.0), ("forward_kl", 1.0), ("reverse_kl", 1.0)])
def test_gradcheck_fp64(divergence, temperature, row_blocks):  # T = 1: the shared log-softmax path
    g = torch.Generator().manual_seed(1)
    h_s, w_s = torch.randn(1, 5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    h_t, w_t = torch.randn(1, 5, 2, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 0, 6, 2]])
    fn = lambda hs, ws: fused_linear_kd_and_ce(hs, ws, h_t, w_t, labels, kd_weight=0.7, ce_weight=0.3,  # noqa: E731
                                               divergence=divergence, temperature=temperature, chunk_size=4)[0]
    assert torch.autograd.gradcheck(fn, (h_s.requires_grad_(True), w_s.requires_grad_(True)))


def test_every_label_masked_gives_zero_and_zero_gradient():
    h_s, w_s, h_t, w_t, labels = heads()
    loss, kd, ce, g_h, g_w = both(lambda hs, ws: fused_linear_kd_and_ce(
        hs, ws, h_t, w_t, torch.full_like(labels, -100), kd_weight=1.0, ce_weight=1.0), h_s, w_s)
    assert float(loss) == float(kd) == float(ce) == 0.0 and not g_h.any() and not g_w.any()


def test_bad_inputs_raise_distil_error():
    h_s, w_s, h_t, w_t, labels = heads()
    with pytest.raises(DistilError, match="labels must be integer class indices"):
        fused_linear_kd_and_ce(h_s, w_s, h_t, w_t, labels.float(), kd_weight=1.0, ce_weight=1.0)
    with pytest.raises(DistilError, match=">= 0"):
        fused_linear_kd_and_ce(h_s, w_s, h_t, w_t, labels, kd_weight=-1.0, ce_weight=1.0)
    with pytest.raises(DistilError, match=r"labels must lie in \[0, 37\)"):
        fused_linear_kd_and_ce(h_s, w_s, h_t, w_t, labels.clamp_min(0) + 37, kd_weight=1.0, ce_weight=1.0)
