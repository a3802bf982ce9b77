"""Cached targets + CE in one chunked pass equal the plain path (materialised logits, cached_divergence and
F.cross_entropy), in value and gradient, for every cache mode and sparse divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distil.cache.writer import topk_targets
from distil.errors import DistilError
from distil.losses.cached import cached_divergence
from distil.losses.fused import fused_linear_divergence
from distil.losses.fused_sparse import fused_linear_cached_kd_and_ce

V = 37


def topk_batch(lp: torch.Tensor, k: int, tail: bool = True, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """What TeacherCache.targets gives for top-k targets of the teacher log-probabilities ``lp`` [B, L, V]."""
    ids, vals, tails = topk_targets(lp.reshape(-1, lp.shape[-1]), k)
    lead = lp.shape[:-1]
    out = {"ids": ids.reshape(*lead, -1), "logprobs": vals.reshape(*lead, -1), "mask": torch.ones(lead, dtype=torch.bool),
           "temperature": torch.tensor(temperature)}
    if tail:
        out["tail_logmass"] = tails.reshape(lead)
    return out


def sampled_batch(lp: torch.Tensor, draws: int, seed: int = 0, entropy: bool = True) -> dict[str, torch.Tensor]:
    """Sampled targets: each row's distinct drawn ids with count / draws, padded with id 0 and weight 0."""
    g = torch.Generator().manual_seed(seed)
    flat = lp.reshape(-1, lp.shape[-1]).double()
    rows = [torch.multinomial(p.exp(), draws, replacement=True, generator=g).unique(return_counts=True)
            for p in flat]
    width = max(len(i) for i, _ in rows)
    ids, weights = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width)
    for r, (i, c) in enumerate(rows):
        ids[r, :len(i)], weights[r, :len(i)] = i, c.float() / draws
    lead = lp.shape[:-1]
    out = {"ids": ids.reshape(*lead, width), "weights": weights.reshape(*lead, width),
           "mask": torch.ones(lead, dtype=torch.bool), "temperature": torch.tensor(1.0)}
    if entropy:
        out["entropy"] = -(flat.exp() * flat).sum(-1).float().reshape(lead)
    return out


def problem(mode: str, heads: int = V, seed: int = 0, dtype=torch.float32, temperature: float = 1.0):
    """Student hidden [2, 11, 8] and head [heads, 8]; targets of a random teacher over the first V tokens, with two
    positions without a target; labels with a 4-token prompt."""
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(2, 11, 8, generator=g, dtype=dtype), torch.randn(heads, 8, generator=g, dtype=dtype)
    lp = torch.log_softmax(torch.randn(2, 11, V, generator=g) * 2 / temperature, -1)
    if mode == "topk":
        targets = topk_batch(lp, 5, temperature=temperature)
    elif mode == "topk-no-tail":
        targets = topk_batch(lp, 5, tail=False, temperature=temperature)
    else:
        targets = sampled_batch(lp, 16, entropy=mode == "sample")
    targets["mask"][1, -2:] = False  # beyond a cached sample's end
    labels = torch.randint(0, heads, (2, 11), generator=g)
    labels[0, :4] = -100
    return h, w, targets, labels


def reference(h, w, targets, labels, kd_w, ce_w, divergence, temperature, params, vocab=V):
    logits = h @ w.T
    keep = labels != -100
    kd = cached_divergence(logits[..., :vocab], targets, divergence=divergence, temperature=temperature, mask=keep,
                           **params)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / keep.sum().clamp_min(1)
    return kd_w * kd + ce_w * ce, kd, ce


def fused(h, w, targets, labels, kd_w, ce_w, divergence, temperature, params, vocab=V, chunk_size=4):
    return fused_linear_cached_kd_and_ce(h, w, targets, labels, kd_weight=kd_w, ce_weight=ce_w,
                                         divergence=divergence, temperature=temperature, vocab_size=vocab,
                                         chunk_size=chunk_size, **params)


def both(fn, h, w, *rest, **kw):
    hs, ws = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, kd, ce = fn(hs, ws, *rest, **kw)
    loss.backward()
    return loss.detach(), kd.detach(), ce.detach(), hs.grad, ws.grad


def wide(targets):
    return {k: (v.double() if v.is_floating_point() and k != "temperature" else v) for k, v in targets.items()}


def close_as_the_reference(ours, ref, exact):
    """fp32 results as close to the fp64 truth as the plain path's own fp32 results (at most 4x its largest error,
    plus a few ulps of the largest entry): the two forms round differently, and a fixed tolerance would only record
    one machine's rounding."""
    for o, r, e in zip(ours, ref, exact):
        ours_error, ref_error = float((o.double() - e).abs().max()), float((r.double() - e).abs().max())
        assert ours_error <= 4 * ref_error + 8 * torch.finfo(torch.float32).eps * float(e.abs().max()), \
            (ours_error, ref_error)


def check_equal(h, w, targets, labels, *args, vocab=V):
    ours = both(fused, h, w, targets, labels, *args, vocab=vocab)
    ref = both(reference, h, w, targets, labels, *args, vocab=vocab)
    exact = both(reference, h.double(), w.double(), wide(targets), labels, *args, vocab=vocab)
    ours64 = both(fused, h.double(), w.double(), wide(targets), labels, *args, vocab=vocab)
    for a, b in zip(ours64, exact):  # the same function in fp64: equal to rounding
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    close_as_the_reference(ours, ref, exact)


CASES = [("topk", "forward_kl", {}, 1.0), ("topk", "forward_kl", {}, 2.0), ("topk", "reverse_kl", {}, 1.0),
         ("topk", "jsd", {"beta": 0.3}, 1.5), ("topk-no-tail", "forward_kl", {}, 1.0),
         ("sample", "forward_kl", {}, 1.0), ("sample-no-entropy", "forward_kl", {}, 1.0)]


@pytest.mark.parametrize("mode,divergence,params,temperature", CASES)
@pytest.mark.parametrize("weights", [(0.5 * 4, 0.5), (1.0, 0.0), (0.0, 1.0)], ids=["both", "kd-only", "ce-only"])
def test_equals_the_plain_path(mode, divergence, params, temperature, weights, row_blocks):
    h, w, targets, labels = problem(mode, temperature=temperature)
    check_equal(h, w, targets, labels, *weights, divergence, temperature, params)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_a_peaked_student_gets_its_exact_tail(divergence, row_blocks):
    """A student with almost all its mass on the stored ids (the plain path's exact-tail rows): still equal."""
    h, w, targets, labels = problem("topk")
    h = h.clone()
    h[0, 5:] *= 8  # a sharp student on these rows, and a teacher whose top 5 are the student's top 5
    student = torch.log_softmax(h @ w.T, -1)
    teacher = torch.log_softmax(torch.randn(2, 11, V, generator=torch.Generator().manual_seed(9)) * 2, -1)
    teacher[0, 5:] = torch.log_softmax(student[0, 5:] * 0.5, -1)
    targets = {**topk_batch(teacher, 5), "mask": targets["mask"]}
    stored = student[0, 5:].gather(-1, targets["ids"][0, 5:]).exp().sum(-1)
    assert float(stored.min()) > 1 - 1e-3  # the rows the plain path sums exactly
    check_equal(h, w, targets, labels, 1.0, 0.5, divergence, 1.0, {})


def test_a_student_head_wider_than_the_cache(row_blocks):
    """Head 40 rows, cache vocabulary 37: the divergence over the 37, the CE over all 40."""
    h, w, targets, labels = problem("topk", heads=40)
    for temperature in (1.0, 2.0):
        targets["temperature"] = torch.tensor(temperature)
        check_equal(h, w, targets, labels, 1.5, 0.5, "forward_kl", temperature, {}, vocab=V)


def test_k_equal_vocabulary_is_the_live_fused_divergence():
    """Top-k over the whole vocabulary is the teacher's full distribution: the live fused loss's value and gradient."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(3, 7, 8, generator=g, dtype=torch.float64), torch.randn(V, 8, generator=g, dtype=torch.float64)
    h_t, w_t = torch.randn(3, 7, 6, generator=g, dtype=torch.float64), torch.randn(V, 6, generator=g,
                                                                                    dtype=torch.float64)
    targets = wide(topk_batch(torch.log_softmax(h_t @ w_t.T, -1), V))
    labels = torch.zeros(3, 7, dtype=torch.long)
    ours = both(fused, h, w, targets, labels, 1.0, 0.0, "reverse_kl", 1.0, {})
    live = both(lambda hs, ws: (fused_linear_divergence(hs, ws, h_t, w_t, divergence="reverse_kl"),) * 3, h, w)
    for a, b in zip(ours[:1] + ours[3:], live[:1] + live[3:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode,divergence,temperature", [("topk", "jsd", 2.0), ("topk", "forward_kl", 1.0),
                                                         ("sample", "forward_kl", 1.0)])
def test_gradcheck_fp64(mode, divergence, temperature, row_blocks):
    h, w, targets, labels = problem(mode, dtype=torch.float64, temperature=temperature)
    h, w = h[:1, :6].contiguous(), w[:, :3].contiguous()
    h = h[..., :3].contiguous()
    targets = {k: (v[:1, :6] if v.dim() else v) for k, v in wide(targets).items()}
    fn = lambda hs, ws: fused(hs, ws, targets, labels[:1, :6], 0.7, 0.3, divergence, temperature, {})[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(True), w.requires_grad_(True)))


def test_no_labelled_position_gives_zero_and_a_zero_gradient():
    h, w, targets, labels = problem("topk")
    loss, kd, ce, g_h, g_w = both(fused, h, w, targets, torch.full_like(labels, -100), 1.0, 1.0, "forward_kl", 1.0,
                                  {})
    assert float(loss) == float(kd) == float(ce) == 0.0 and not g_h.any() and not g_w.any()


def test_bad_inputs_name_the_problem():
    h, w, targets, labels = problem("topk")
    args = (1.0, 1.0)
    with pytest.raises(DistilError, match="no fused path"):
        fused(h, w, {"logprobs": torch.zeros(2, 11, V), "mask": targets["mask"]}, labels, *args, "forward_kl", 1.0, {})
    no_tail = {k: v for k, v in targets.items() if k != "tail_logmass"}
    with pytest.raises(DistilError, match="needs tail_logmass"):
        fused(h, w, no_tail, labels, *args, "reverse_kl", 1.0, {})
    with pytest.raises(DistilError, match="rebuild the cache at this temperature"):
        fused(h, w, targets, labels, *args, "forward_kl", 2.0, {})
    with pytest.raises(DistilError, match="outside the student's vocabulary of 30"):
        fused(h, w, targets, labels.clamp_max(29), *args, "forward_kl", 1.0, {}, vocab=30)
    with pytest.raises(DistilError, match="slice them alike"):
        fused(h[:, :-1], w, targets, labels[:, :-1], *args, "forward_kl", 1.0, {})
    with pytest.raises(DistilError, match="sampled cache gives unbiased forward KL only"):
        fused(h, w, problem("sample")[2], labels, *args, "jsd", 1.0, {})
    with pytest.raises(DistilError, match="labels must lie in"):
        fused(h, w, targets, labels + V, *args, "forward_kl", 1.0, {})
