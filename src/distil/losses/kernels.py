"""Fused kernels of the divergences: per chunk of rows, the divergence and its gradient with respect to the student's
log-probabilities, for :func:`distil.losses.fused.fused_linear_divergence`.

Each kernel takes the floored log-probabilities lp_s, lp_t and the probabilities p_s, p_t ([C, V], compute dtype)
and returns the per-row divergence and g = d(divergence) / d(lp_s); the chain rule through log_softmax is applied
once, in the fused loop. These are the analytic derivatives of the formulas in :mod:`distil.losses.logits`; the tests
check them against autograd on the plain path. Mixtures are formed from probabilities (one log instead of a
logaddexp), floored at the smallest normal number so that 0 * log(0) never appears. Several kernels reuse lp_t and p_t
in place (the caller does not read them afterwards); none changes lp_s or p_s, which the chain rule reads.
"""

from __future__ import annotations

import torch

__all__ = ["jsd_kernel", "forward_kl_kernel", "reverse_kl_kernel", "skew_kl_kernel", "skew_reverse_kl_kernel",
           "tvd_kernel"]


def _log_mix(p_a: torch.Tensor, p_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p_a + (1 - w) * p_b)."""
    return torch.lerp(p_b, p_a, w).clamp_min_(torch.finfo(p_a.dtype).tiny).log_()


def forward_kl_kernel(lp_s, lp_t, p_s, p_t):
    values = lp_t.sub_(lp_s).mul_(p_t).sum(-1)
    return values, p_t.neg_()


def reverse_kl_kernel(lp_s, lp_t, p_s, p_t):
    r = lp_s - lp_t
    values = (p_s * r).sum(-1)
    return values, r.add_(1.0).mul_(p_s)


def jsd_kernel(lp_s, lp_t, p_s, p_t, beta):
    if beta == 0.0:
        return forward_kl_kernel(lp_s, lp_t, p_s, p_t)
    if beta == 1.0:
        return reverse_kl_kernel(lp_s, lp_t, p_s, p_t)
    lp_m = _log_mix(p_t, p_s, beta)
    values = beta * (lp_t - lp_m).mul_(p_t).sum(-1)
    d_s = lp_m.neg_().add_(lp_s)  # lp_s - lp_m, in place
    values += (1.0 - beta) * (d_s * p_s).sum(-1)
    # d/d lp_s of beta KL(p_t || m) + (1 - beta) KL(p_s || m): the terms through m cancel, leaving this.
    return values, d_s.mul_(p_s).mul_(1.0 - beta)


def skew_kl_kernel(lp_s, lp_t, p_s, p_t, alpha):
    if alpha == 0.0:
        return forward_kl_kernel(lp_s, lp_t, p_s, p_t)
    if alpha == 1.0:
        return lp_s.new_zeros(lp_s.shape[0]), torch.zeros_like(lp_s)
    lp_m = _log_mix(p_t, p_s, alpha)
    values = (lp_t - lp_m).mul_(p_t).sum(-1)
    # g = -(1 - alpha) p_t p_s / m
    return values, lp_m.neg_().add_(lp_s).exp_().mul_(p_t).mul_(alpha - 1.0)


def skew_reverse_kl_kernel(lp_s, lp_t, p_s, p_t, alpha):
    if alpha == 0.0:
        return reverse_kl_kernel(lp_s, lp_t, p_s, p_t)
    if alpha == 1.0:
        return lp_s.new_zeros(lp_s.shape[0]), torch.zeros_like(lp_s)
    lp_m = _log_mix(p_s, p_t, alpha)
    d = lp_s - lp_m
    values = (d * p_s).sum(-1)
    # g = p_s * (log(p_s / m) + (1 - alpha) p_t / m)
    g = lp_m.neg_().add_(lp_t).exp_().mul_(1.0 - alpha).add_(d)
    return values, g.mul_(p_s)


def tvd_kernel(lp_s, lp_t, p_s, p_t):
    diff = p_t - p_s
    values = 0.5 * diff.abs().sum(-1)
    return values, diff.sign_().mul_(p_s).mul_(-0.5)
