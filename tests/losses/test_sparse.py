"""Sparse divergences: pinned to hand-written dense and bucketed references, gradients, masks, unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from distil.cache.writer import draw_tokens, sample_targets, topk_targets
from distil.errors import DistilError
from distil.losses.cached import cached_divergence
from distil.losses.sparse import (
    sampled_forward_kl,
    sparse_forward_kl,
    sparse_jsd,
    sparse_reverse_kl,
)

V = 11


# ------------------------------------------------------------------------------------ independent references
def probs(logits: torch.Tensor, t: float = 1.0) -> list[list[float]]:
    """Softmax row by row with Python floats (no torch maths shared with the code under test)."""
    out = []
    for row in logits.reshape(-1, logits.shape[-1]).tolist():
        e = [math.exp(x / t) for x in row]
        s = sum(e)
        out.append([x / s for x in e])
    return out


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def coarsen(p: list[float], ids: list[int]) -> list[float]:
    """The distribution over buckets: each listed id, then everything else."""
    return [p[i] for i in ids] + [sum(x for j, x in enumerate(p) if j not in set(ids))]


def make(shape=(2, 3), k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, V, generator=g, dtype=dtype) * 2
    t = torch.randn(*shape, V, generator=g, dtype=dtype) * 2
    lp = torch.log_softmax(t, -1)
    ids, vals, tail = topk_targets(lp.reshape(-1, V), k)
    return s, t, ids.reshape(*shape, -1), vals.reshape(*shape, -1), tail.reshape(shape)


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_k_equal_vocab_is_the_dense_divergence(temperature):
    s, t, _, _, _ = make()
    lp_t = torch.log_softmax(t, -1)
    ids, vals, tail = topk_targets(lp_t.reshape(-1, V), V)
    ids, vals, tail = ids.reshape(2, 3, V), vals.reshape(2, 3, V), tail.reshape(2, 3)
    assert torch.isinf(tail).all()
    P, Q = probs(t), probs(s, temperature)
    kw = dict(tail_logmass=tail, temperature=temperature, reduction="none")
    fwd = sparse_forward_kl(s, ids, vals, **kw).reshape(-1)
    rev = sparse_reverse_kl(s, ids, vals, **kw).reshape(-1)
    js = sparse_jsd(s, ids, vals, beta=0.3, **kw).reshape(-1)
    for r in range(6):
        assert fwd[r].item() == pytest.approx(kl(P[r], Q[r]), abs=1e-12, rel=1e-10)
        assert rev[r].item() == pytest.approx(kl(Q[r], P[r]), abs=1e-12, rel=1e-10)
        assert js[r].item() == pytest.approx(jsd(P[r], Q[r], 0.3), abs=1e-12, rel=1e-10)
    # Full distributions (target_ids=None, a cache in "full" mode) are the dense divergence too.
    full = sparse_forward_kl(s, None, lp_t, temperature=temperature, reduction="none").reshape(-1)
    torch.testing.assert_close(full, fwd, rtol=1e-10, atol=1e-12)


def test_topk_is_the_divergence_between_coarsened_distributions():
    s, t, ids, vals, tail = make(k=4)
    P, Q = probs(t), probs(s)
    flat_ids = ids.reshape(-1, 4).tolist()
    fwd = sparse_forward_kl(s, ids, vals, tail_logmass=tail, reduction="none").reshape(-1)
    rev = sparse_reverse_kl(s, ids, vals, tail_logmass=tail, reduction="none").reshape(-1)
    js = sparse_jsd(s, ids, vals, tail_logmass=tail, beta=0.7, reduction="none").reshape(-1)
    for r in range(6):
        p, q = coarsen(P[r], flat_ids[r]), coarsen(Q[r], flat_ids[r])
        assert fwd[r].item() == pytest.approx(kl(p, q), rel=1e-10)
        assert rev[r].item() == pytest.approx(kl(q, p), rel=1e-10)
        assert js[r].item() == pytest.approx(jsd(p, q, 0.7), rel=1e-10)
        # Coarsening never increases a divergence: a lower bound of the dense one.
        assert fwd[r].item() <= kl(P[r], Q[r]) + 1e-12
        assert rev[r].item() <= kl(Q[r], P[r]) + 1e-12


def test_without_tail_sums_the_stored_tokens_against_the_full_student():
    s, t, ids, vals, _ = make(k=3)
    P, Q = probs(t), probs(s)
    got = sparse_forward_kl(s, ids, vals, reduction="none").reshape(-1)
    for r, row in enumerate(ids.reshape(-1, 3).tolist()):
        assert got[r].item() == pytest.approx(sum(P[r][i] * math.log(P[r][i] / Q[r][i]) for i in row), rel=1e-10)


def test_student_is_normalised_over_the_whole_vocabulary():
    # Moving the student's mass between tokens outside the stored ids must change nothing in the stored buckets,
    # but raising it (at the stored tokens' expense) must raise the loss: a top-k-renormalised student would not see it.
    s, _, ids, vals, tail = make(shape=(1,), k=3)
    outside = [i for i in range(V) if i not in ids[0].tolist()]
    base = sparse_forward_kl(s, ids, vals, tail_logmass=tail)
    more_tail = s.clone()
    more_tail[0, outside] += 3.0
    assert sparse_forward_kl(more_tail, ids, vals, tail_logmass=tail) > base + 0.1
    assert sparse_forward_kl(more_tail, ids, vals) > sparse_forward_kl(s, ids, vals) + 0.1


def test_padding_entries_change_nothing_whatever_their_id():
    s, _, ids, vals, tail = make(k=3)
    ref = sparse_jsd(s, ids, vals, tail_logmass=tail, reduction="none")
    for pad_id in (0, int(ids[0, 0, 0]), V - 1):
        pids = torch.cat([ids, torch.full_like(ids[..., :2], pad_id)], -1)
        pvals = torch.cat([vals, torch.full_like(vals[..., :2], -math.inf)], -1)
        for fn in (sparse_forward_kl, sparse_reverse_kl, sparse_jsd):
            got = fn(s, pids, pvals, tail_logmass=tail, reduction="none")
            want = fn(s, ids, vals, tail_logmass=tail, reduction="none") if fn is not sparse_jsd else ref
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_identical_distributions_give_zero():
    s, _, _, _, _ = make()
    ids, vals, tail = topk_targets(torch.log_softmax(s, -1).reshape(-1, V), 5)
    s2 = s.reshape(-1, V)
    for fn in (sparse_forward_kl, sparse_reverse_kl, sparse_jsd):
        assert fn(s2, ids, vals, tail_logmass=tail).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------- masks, reductions
def test_mask_drops_positions_even_if_they_hold_nan():
    s, _, ids, vals, tail = make()
    mask = torch.tensor([[True, False, True], [False, False, True]])
    bad = s.clone()
    bad[~mask] = math.nan
    per = sparse_forward_kl(s, ids, vals, tail_logmass=tail, reduction="none")
    got = sparse_forward_kl(bad, ids, vals, tail_logmass=tail, mask=mask)
    assert got.item() == pytest.approx(per[mask].mean().item(), rel=1e-12)
    none = sparse_forward_kl(bad, ids, vals, tail_logmass=tail, mask=mask, reduction="none")
    assert torch.equal(none[~mask], torch.zeros(3, dtype=none.dtype))
    summed = sparse_forward_kl(s, ids, vals, tail_logmass=tail, mask=mask, reduction="sum")
    assert summed.item() == pytest.approx(per[mask].sum().item(), rel=1e-12)


def test_all_masked_gives_zero_with_zero_gradient():
    s, _, ids, vals, tail = make()
    s.requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for loss in (
        sparse_forward_kl(s, ids, vals, tail_logmass=tail, mask=mask),
        sparse_jsd(s, ids, vals, tail_logmass=tail, mask=mask),
        sampled_forward_kl(s, ids, vals.exp(), mask=mask),
    ):
        (g,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_low_precision_inputs_compute_in_float32():
    s, _, ids, vals, tail = make(dtype=torch.float64)
    ref = sparse_forward_kl(s, ids, vals, tail_logmass=tail)
    got = sparse_forward_kl(s.bfloat16(), ids, vals.half(), tail_logmass=tail.half())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("fn", [sparse_forward_kl, sparse_reverse_kl, sparse_jsd])
def test_gradcheck_bucketed(fn):
    s, _, ids, vals, tail = make(k=4)
    s.requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(lambda x: fn(x, ids, vals, tail_logmass=tail, temperature=1.7, mask=mask), (s,))


def test_gradcheck_k_equal_vocab_and_sampled():
    s, t, _, _, _ = make()
    ids, vals, tail = topk_targets(torch.log_softmax(t, -1).reshape(-1, V), V)
    x = s.reshape(-1, V).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sparse_reverse_kl(z, ids, vals, tail_logmass=tail), (x,))
    w = torch.softmax(t, -1).reshape(-1, V)[:, :5]
    assert torch.autograd.gradcheck(
        lambda z: sampled_forward_kl(z, ids[:, :5], w, teacher_entropy=torch.ones(6, dtype=z.dtype)), (x,)
    )


def test_forward_gradient_equals_dense_gradient_when_k_is_vocab():
    s, t, _, _, _ = make()
    lp = torch.log_softmax(t, -1)
    ids, vals, tail = topk_targets(lp.reshape(-1, V), V)
    x = s.reshape(-1, V).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sparse_forward_kl(x, ids, vals, tail_logmass=tail, reduction="sum"), x)
    torch.testing.assert_close(g, torch.softmax(x.detach(), -1) - lp.reshape(-1, V).exp(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ sampling
def _estimates(draws: int, replicates: int, seed: int, distinct_only: bool = False, sampling: str = "multinomial"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    s = torch.randn(V, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(t, -1)
    # The cache's own sampler, on many independent rows of the same teacher distribution.
    row_counts, ids, counts, entropy = sample_targets(lp.expand(replicates, V), draws, g, sampling)
    width = int(row_counts.max())
    pid = torch.zeros(replicates, width, dtype=torch.long)
    pw = torch.zeros(replicates, width, dtype=torch.float64)
    row = torch.repeat_interleave(torch.arange(replicates), row_counts)
    col = torch.arange(len(ids)) - torch.repeat_interleave(torch.cumsum(row_counts, 0) - row_counts, row_counts)
    pid[row, col] = ids
    pw[row, col] = (torch.ones_like(counts) / row_counts[row] if distinct_only else counts / draws).double()
    x = s.expand(replicates, V).clone().requires_grad_(True)
    est = sampled_forward_kl(x, pid, pw, teacher_entropy=entropy.double(), reduction="none")
    (grad,) = torch.autograd.grad(est.sum(), x)
    P, Q = probs(t)[0], probs(s)[0]
    return est.detach(), grad, kl(P, Q), torch.tensor(Q, dtype=torch.float64) - torch.tensor(P, dtype=torch.float64)


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_sampled_estimator_is_unbiased(sampling):
    est, grad, exact, exact_grad = _estimates(draws=8, replicates=20000, seed=0, sampling=sampling)
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean().item() - exact) < 4 * se.item()
    gse = grad.std(0) / math.sqrt(len(grad))
    assert ((grad.mean(0) - exact_grad).abs() < 4 * gse + 1e-12).all()


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_the_unbiasedness_test_detects_a_biased_estimator(sampling):
    # Weighting each distinct drawn token equally (ignoring counts) is a known biased variant: the same test rejects it.
    est, _, exact, _ = _estimates(draws=8, replicates=20000, seed=0, distinct_only=True, sampling=sampling)
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean().item() - exact) > 4 * se.item()


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_sampled_weights_have_the_teacher_probabilities_as_mean(sampling):
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(V, generator=g) * 2, -1)
    reps, draws = 5000, 4
    row_counts, ids, counts, entropy = sample_targets(lp.expand(reps, V), draws, g, sampling)
    assert int(row_counts.sum()) == len(ids) and int(counts.sum()) == reps * draws
    row = torch.repeat_interleave(torch.arange(reps), row_counts)
    dense = torch.zeros(reps, V, dtype=torch.float64)
    dense[row, ids] = counts.double() / draws
    z = (dense.mean(0) - lp.exp().double()) / (dense.std(0) / math.sqrt(reps) + 1e-12)
    assert z.abs().max() < 4.5
    assert entropy[0].item() == pytest.approx(-(lp.exp() * lp).sum().item(), rel=1e-5)


def _dense_counts(row_counts, ids, counts, vocab):
    row = torch.repeat_interleave(torch.arange(len(row_counts)), row_counts)
    dense = torch.zeros(len(row_counts), vocab, dtype=torch.long)
    dense[row, ids] = counts
    return dense


@pytest.mark.parametrize("sampling, within_one", [("systematic", True), ("multinomial", False)])
def test_systematic_draws_stay_within_one_of_n_times_the_probability(sampling, within_one):
    """Systematic sampling draws every token floor(n p) or ceil(n p) times, on every row: the property that lowers its
    variance. Independent draws do not (the same check fails for them)."""
    g = torch.Generator().manual_seed(5)
    rows, vocab, n = 400, 1000, 64
    lp = torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2, -1)
    dense = _dense_counts(*sample_targets(lp, n, g, sampling)[:3], vocab)
    assert (dense.sum(-1) == n).all()
    expected = lp.exp() * n
    # n p in float64 is off by ~1e-13 at most: a count exactly at an integer boundary may go either way.
    inside = (dense >= torch.floor(expected - 1e-9)) & (dense <= torch.ceil(expected + 1e-9))
    assert bool(inside.all()) == within_one


def test_systematic_draws_never_take_a_zero_probability_token():
    # Zero-probability tokens first, in the middle and last (a point rounded up to the total must not reach them),
    # with one token of nearly all the mass, so that many points sit close to the total.
    z = torch.full((2000, 50), -math.inf)
    z[:, 3:40] = torch.randn(2000, 37, generator=torch.Generator().manual_seed(1))
    z[:, 39] = 30.0
    z[:, 20] = -math.inf
    row_counts, ids, counts, _ = sample_targets(torch.log_softmax(z, -1), 64, torch.Generator().manual_seed(2))
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[3:40] = True
    allowed[20] = False
    assert allowed[ids].all() and int(counts.sum()) == 2000 * 64


def test_systematic_point_rounded_to_the_total_stays_on_the_last_drawable_token(monkeypatch):
    # An offset just below 1: (u + 63) rounds to 64 in float32, so the last point equals the total.
    below_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, below_one, dtype=kw.get("dtype")))
    z = torch.zeros(3, 10)
    z[:, 7:] = -math.inf
    draws = draw_tokens(z.exp(), 64, torch.Generator(), "systematic")
    assert int(draws.max()) == 6 and int((draws == 6).sum(-1).min()) >= 6


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="unknown sampling"):
        sample_targets(torch.zeros(2, 4), 8, torch.Generator(), "stratified")


# -------------------------------------------------------------------------------------------- errors, dispatch
def test_errors_are_clear():
    s, _, ids, vals, tail = make()
    with pytest.raises(DistilError, match="needs tail_logmass"):
        sparse_reverse_kl(s, ids, vals)
    with pytest.raises(DistilError, match="differ in shape"):
        sparse_forward_kl(s, ids[..., :2], vals)
    with pytest.raises(DistilError, match="outside the student's vocabulary"):
        sparse_forward_kl(s, ids + V, vals)
    with pytest.raises(DistilError, match="temperature"):
        sparse_forward_kl(s, ids, vals, temperature=0.0)
    with pytest.raises(DistilError, match="mask must be"):
        sparse_forward_kl(s, ids, vals, mask=torch.ones(2, 3))
    with pytest.raises(DistilError, match="beta"):
        sparse_jsd(s, ids, vals, tail_logmass=tail, beta=1.5)


def test_cached_divergence_dispatches_on_the_targets():
    s, t, ids, vals, tail = make()
    mask = torch.tensor([[True, False, True], [True, True, False]])
    topk = {"ids": ids, "logprobs": vals, "tail_logmass": tail, "mask": mask}
    assert cached_divergence(s, topk).item() == sparse_forward_kl(s, ids, vals, tail_logmass=tail, mask=mask).item()
    assert cached_divergence(s, topk, divergence="jsd", beta=0.2).item() == pytest.approx(
        sparse_jsd(s, ids, vals, tail_logmass=tail, beta=0.2, mask=mask).item())
    full = {"logprobs": torch.log_softmax(t, -1), "mask": mask}
    assert cached_divergence(s, full, divergence="reverse_kl").item() == pytest.approx(
        sparse_reverse_kl(s, None, full["logprobs"], mask=mask).item())
    sampled = {"ids": ids, "weights": vals.exp(), "entropy": torch.zeros(2, 3), "mask": mask}
    extra = torch.tensor([[True, True, True], [False, True, True]])
    assert cached_divergence(s, sampled, mask=extra).item() == pytest.approx(
        sampled_forward_kl(s, ids, vals.exp(), teacher_entropy=torch.zeros(2, 3), mask=mask & extra).item())
    with pytest.raises(DistilError, match="forward KL only"):
        cached_divergence(s, sampled, divergence="reverse_kl")


# ------------------------------------------------------------------------------------- the student's tail mass
def _peaked(seed=5):
    """Rows whose student puts almost all its mass on the stored ids (tails from ~1e-1 down to ~1e-9)."""
    s, t, ids, vals, tail = make(shape=(6,), k=3, seed=seed)
    s = s.clone()
    for r, boost in enumerate([0.0, 3.0, 6.0, 9.0, 12.0, 20.0]):
        s[r, ids[r]] += boost
    return s, t, ids, vals, tail


@pytest.mark.parametrize("threshold", [0.0, 1e-3, 1.0])  # always 1 - sum, the default split, always exact
def test_both_ways_of_computing_the_student_tail_agree(monkeypatch, threshold):
    import distil.losses.sparse as sparse

    s, t, ids, vals, tail = _peaked()
    P, Q = probs(t), probs(s)
    if threshold != 0.0:  # 1 - sum cannot resolve the smallest tails; the exact sum can
        monkeypatch.setattr(sparse, "_EXACT_TAIL_BELOW", threshold)
        got = sparse_forward_kl(s, ids, vals, tail_logmass=tail, reduction="none")
        for r, row in enumerate(ids.tolist()):
            assert got[r].item() == pytest.approx(kl(coarsen(P[r], row), coarsen(Q[r], row)), rel=1e-9)
    x = s.clone().requires_grad_(True)
    monkeypatch.setattr(sparse, "_EXACT_TAIL_BELOW", threshold)
    assert torch.autograd.gradcheck(lambda z: sparse_reverse_kl(z, ids, vals, tail_logmass=tail), (x,))


def test_float32_student_tail_is_accurate():
    s, _, ids, vals, tail = _peaked()
    ref = sparse_forward_kl(s, ids, vals, tail_logmass=tail, reduction="none")
    got = sparse_forward_kl(s.float(), ids, vals.float(), tail_logmass=tail.float(), reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    x64, x32 = s.clone().requires_grad_(True), s.float().requires_grad_(True)
    sparse_forward_kl(x64, ids, vals, tail_logmass=tail).backward()
    sparse_forward_kl(x32, ids, vals.float(), tail_logmass=tail.float()).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_topk_targets_from_logits_equal_those_of_the_log_softmax():
    """The build's form (from logits, cheap tail where float16 keeps its precision) equals topk_targets of the
    log-softmax: ids exactly, log-probabilities and tails to float32 rounding, on flat, peaked and k = V rows."""
    from distil.cache.writer import _CHEAP_TAIL_FROM, topk_targets_from_logits

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 300, generator=g) * 3
    z[1, 7] = 40.0  # a peaked row: tail below _CHEAP_TAIL_FROM, summed exactly
    z[2] = 0.0  # a flat row
    for k in (5, 64, 300):
        ids, lp, tail = topk_targets(torch.log_softmax(z.double(), -1), k)
        ids2, lp2, tail2 = topk_targets_from_logits(z.clone(), k)
        same = ids2.sort(-1).values == ids.sort(-1).values
        assert same[[0, 1, 3, 4, 5]].all()  # the flat row's ties may pick other ids of equal probability
        torch.testing.assert_close(lp2.double(), lp, rtol=0, atol=2e-5)
        finite = tail.isfinite()
        assert torch.equal(finite, tail2.isfinite()) and (k == 300) == (not finite.any())
        # 1 - sum(k float32 probabilities): at most k roundings of 1.2e-7 each, relative to a tail >= _CHEAP_TAIL_FROM
        rtol = k * torch.finfo(torch.float32).eps / _CHEAP_TAIL_FROM + 1e-6
        torch.testing.assert_close(tail2.double()[finite], tail[finite], rtol=rtol, atol=0)
    assert float(topk_targets_from_logits(z.clone(), 5)[2][1].exp()) < _CHEAP_TAIL_FROM  # the peaked row took the exact path


def test_sample_targets_from_logits_draw_from_the_same_distribution():
    """The build's form: the entropy equals the log-softmax's (with a -inf logit too), and with one shared seed
    the draws are those of sample_targets (multinomial of the same distribution, unnormalised)."""
    from distil.cache.writer import sample_targets_from_logits

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 200, generator=g) * 3
    z[3, 11] = -math.inf
    lp = torch.log_softmax(z.double(), -1)
    ref = sample_targets(lp.float(), 64, torch.Generator().manual_seed(7))
    ours = sample_targets_from_logits(z.clone(), 64, torch.Generator().manual_seed(7))
    exact_entropy = -(lp.exp() * lp.clamp_min(-1e300)).sum(-1)
    # float32 sums over 200 terms of size up to ~10: a few ulps of 10 * 200
    torch.testing.assert_close(ours[3].double(), exact_entropy, rtol=0, atol=200 * 10 * 1.2e-7)
    assert float(ours[1][ours[1] >= 0].eq(11).logical_and(torch.repeat_interleave(
        torch.arange(5), ours[0]) == 3).sum()) == 0  # the -inf token is never drawn
    # The same uniforms through cumulative sums that round differently: a draw may land in the next bin only where
    # the two sums straddle it (about 1e-7 of the time); allow two such draws over the 320, each moving 2 counts.
    def counts(row_counts, ids, n):
        rows = torch.repeat_interleave(torch.arange(5), row_counts)
        return torch.zeros(5, 200, dtype=torch.long).index_put_((rows, ids), n, accumulate=True)

    moved = (counts(*ours[:3]) - counts(*ref[:3])).abs().sum()
    assert int(moved) <= 4 and int(counts(*ours[:3]).sum()) == 5 * 64
