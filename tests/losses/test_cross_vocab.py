"""Cross-vocabulary losses: ULD and the vocabulary-mapped KL pinned on hand-worked cases, gradients checked in
float64, equality with forward KL when both sides share a vocabulary, chunked equal to plain, masks and -inf."""

import math

import pytest
import torch

from distil.losses import forward_kl
from distil.losses.cross_vocab import (Merges, VocabMap, chunked_cross_vocab, mapped_kl, mapped_kl_per_position,
                                       uld, uld_per_position)


def logits_of(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_uld_by_hand_and_invariant_to_token_order():
    s = logits_of([0.7, 0.2, 0.1])
    t = logits_of([0.05, 0.5, 0.15, 0.3])
    # Sorted: (.7, .2, .1) against (.5, .3, .15, .05): |.2| + |-.1| + |-.05| + the teacher's tail .05.
    assert uld(s, t).item() == pytest.approx(0.4, abs=1e-12)
    assert uld(s[:, [2, 0, 1]], t[:, [3, 1, 0, 2]]).item() == pytest.approx(0.4, abs=1e-12)
    same = logits_of([0.1, 0.6, 0.3])
    assert uld(same, same[:, [1, 2, 0]]).item() == pytest.approx(0.0, abs=1e-12)
    # Temperature softens both before sorting: at T=2, p is proportional to sqrt(p).
    soft = lambda p: [math.sqrt(x) / sum(math.sqrt(y) for y in p) for x in p]  # noqa: E731
    a, b = soft([0.7, 0.2, 0.1]), sorted(soft([0.05, 0.5, 0.15, 0.3]), reverse=True)
    expected = sum(abs(x - y) for x, y in zip(sorted(a, reverse=True), b)) + b[3]
    assert uld(s, t, temperature=2.0).item() == pytest.approx(expected, abs=1e-12)


def test_mapped_kl_by_hand_with_the_rest_as_one_outcome():
    # Student tokens (a, b, c), teacher tokens (a, b, d): a and b are mapped, c and d are each side's rest.
    vocab = VocabMap(torch.tensor([0, 1]), torch.tensor([0, 1]))
    s, t = logits_of([0.4, 0.4, 0.2]), logits_of([0.5, 0.3, 0.2])
    kl = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert mapped_kl(s, t, vocab).item() == pytest.approx(kl, abs=1e-12)  # residuals (.2) and (.2): ULD 0
    s2 = logits_of([0.4, 0.4, 0.15, 0.05])  # a fourth student token: the rest is (.15, .05) against (.2)
    kl2 = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert mapped_kl(s2, t, vocab).item() == pytest.approx(kl2 + 0.05 + 0.05, abs=1e-12)
    assert mapped_kl(s2, t, vocab, uld_weight=0.0, kl_weight=2.0).item() == pytest.approx(2 * kl2, abs=1e-12)


def test_a_student_token_spelled_by_two_teacher_tokens_takes_their_product():
    # Student (a, b, c="xy", e); teacher (a, b, d="x"). The teacher says "x" with .2, then "y" after it with .6:
    # it says "xy" with .12, which leaves "x"-then-something-else .08 in its rest.
    vocab = VocabMap(torch.tensor([0, 1]), torch.tensor([0, 1]))
    s, t = logits_of([0.4, 0.3, 0.2, 0.1]), logits_of([0.5, 0.3, 0.2])
    merges = Merges(torch.tensor([2]), torch.tensor([2]), torch.tensor([math.log(0.2 * 0.6)], dtype=torch.float64))
    kl = (0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.3) + 0.12 * math.log(0.12 / 0.2)
          + 0.08 * math.log(0.08 / 0.1))
    uld_rest = abs(0.1 - 0.08)  # the student's rest (e .1) against the teacher's (.08)
    assert mapped_kl(s, t, vocab, merges=merges).item() == pytest.approx(kl + uld_rest, abs=1e-12)
    # The first teacher token may be mapped itself (teacher "x" = student token 3): its mass moves the same way.
    vocab2 = VocabMap(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]))
    kl2 = (0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.3) + 0.12 * math.log(0.12 / 0.2)
           + 0.08 * math.log(0.08 / 0.1))
    assert mapped_kl(s, t, vocab2, merges=merges).item() == pytest.approx(kl2, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_one_vocabulary_on_both_sides_is_forward_kl(temperature):
    torch.manual_seed(0)
    s, t = torch.randn(7, 11, dtype=torch.float64), torch.randn(7, 11, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    ids = torch.arange(11)
    perm = torch.randperm(11)  # the same strings under other ids: the map says which is which
    got = mapped_kl(s, t[:, perm], VocabMap(torch.argsort(perm), ids), temperature=temperature, mask=mask)
    assert got.item() == pytest.approx(forward_kl(s, t, temperature=temperature, mask=mask).item(), abs=1e-12)


def test_gradients_in_float64():
    torch.manual_seed(1)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    vocab = VocabMap(torch.tensor([0, 2, 3]), torch.tensor([1, 0, 4]))
    merges = Merges(torch.tensor([-1, 5, -1, 2]), torch.tensor([0, 1, 0, 4]),
                    torch.tensor([0.0, -2.0, 0.0, -3.0], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: mapped_kl(x, t, vocab, merges=merges, temperature=1.5), (s,))
    assert torch.autograd.gradcheck(lambda x: uld(x, t, temperature=1.5), (s,))


def test_masks_and_infinite_logits():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 4)
    vocab = VocabMap(torch.tensor([0, 1]), torch.tensor([0, 1]))
    nothing = torch.zeros(3, dtype=torch.bool)
    for loss in (mapped_kl(s, t, vocab, mask=nothing), uld(s, t, mask=nothing)):
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
        s.grad = None
    masked = s.detach().clone()
    masked[:, 4] = float("-inf")  # a padded vocabulary entry
    t2 = t.clone()
    t2[:, 3] = float("-inf")
    for value in (mapped_kl(masked, t2, vocab), uld(masked, t2)):
        assert torch.isfinite(value)


def test_chunked_equals_plain_values_and_gradients():
    torch.manual_seed(2)
    n, h_s, h_t, v_s, v_t = 10, 6, 5, 9, 13
    hidden_s = torch.randn(n, h_s, dtype=torch.float64, requires_grad=True)
    weight_s = torch.randn(v_s, h_s, dtype=torch.float64, requires_grad=True)
    hidden_t, weight_t = torch.randn(n, h_t, dtype=torch.float64), torch.randn(v_t, h_t, dtype=torch.float64)
    mask = torch.rand(n) > 0.3
    vocab = VocabMap(torch.tensor([0, 3, 7, 12]), torch.tensor([2, 0, 8, 5]))
    merges = Merges(torch.tensor([-1, 4, -1, -1, 1, -1, -1, 6, -1, -1]), torch.tensor([0, 3, 0, 0, 9, 0, 0, 1, 0, 0]),
                    -torch.rand(n, dtype=torch.float64) * 3)
    cases = [(uld_per_position, {}, lambda s, t: uld(s, t, temperature=2.0, mask=mask)),
             (mapped_kl_per_position, {"vocab": vocab},
              lambda s, t: mapped_kl(s, t, vocab, merges=merges, temperature=2.0, mask=mask))]
    for per_position, extra, plain in cases:
        want = plain(hidden_s @ weight_s.T, hidden_t @ weight_t.T)
        g_want = torch.autograd.grad(want, (hidden_s, weight_s))
        kwargs = {**extra, "merges": merges} if extra else {}
        got = chunked_cross_vocab(per_position, hidden_s, weight_s, hidden_t, weight_t, mask=mask, chunk_size=3,
                                  temperature=2.0, **kwargs)
        g_got = torch.autograd.grad(got, (hidden_s, weight_s))
        # float64 throughout: only the order of the sums over chunks differs (a few ulps of values near 1)
        assert abs(got.item() - want.item()) < 1e-12
        for a, b in zip(g_got, g_want):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_top_k_uld_by_hand_and_within_its_bound():
    """top_k ranks the largest entries only and counts the tails by their masses: by hand, exact once top_k reaches
    the smaller vocabulary, and otherwise between exact - 2 * min(tail masses) and exact."""
    s = logits_of([0.7, 0.2, 0.1])
    t = logits_of([0.05, 0.5, 0.15, 0.3])
    # top 2: |.7 - .5| + |.2 - .3| + tails |.1 - .2| = 0.4 (here the exact value too: the tails are one entry each
    # against two, .1 against .15 + .05).
    assert uld(s, t, top_k=2).item() == pytest.approx(0.2 + 0.1 + 0.1, abs=1e-12)
    assert uld(s, t, top_k=1).item() == pytest.approx(0.2 + abs(0.3 - 0.5), abs=1e-12)
    for k in (3, 4, 100):
        assert uld(s, t, top_k=k).item() == pytest.approx(uld(s, t).item(), abs=1e-12)
    torch.manual_seed(0)
    student = torch.randn(64, 300, dtype=torch.float64)  # flat
    teacher = 4 * torch.randn(64, 500, dtype=torch.float64)  # peaked: its tail mass is small, the student's large
    exact = uld_per_position(student, teacher)
    for k in (1, 8, 64, 299):
        approx = uld_per_position(student, teacher, top_k=k)
        p_s, p_t = student.softmax(-1), teacher.softmax(-1)
        tails = torch.minimum(1 - p_s.topk(k, -1).values.sum(-1), 1 - p_t.topk(k, -1).values.sum(-1))
        assert (approx <= exact + 1e-12).all() and (exact - approx <= 2 * tails + 1e-12).all()
        head_only = (p_s.topk(k, -1).values - p_t.topk(k, -1).values).abs().sum(-1)  # tails dropped instead
        assert k == 299 or (exact - head_only > 2 * tails + 1e-6).any()  # the bound tells the two apart
    assert torch.allclose(uld_per_position(student, teacher, top_k=300), exact, atol=1e-12, rtol=0)


def test_top_k_gradients_in_float64():
    torch.manual_seed(1)
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: uld_per_position(x, t, top_k=4), (s,))
    vocab = VocabMap(torch.tensor([0, 2, 5]), torch.tensor([1, 3, 6]))
    assert torch.autograd.gradcheck(lambda x: mapped_kl_per_position(x, t, vocab, top_k=2), (s,))


def test_several_teacher_tokens_counting_as_one_student_token_add_up():
    # Student (a, b, c); teacher (a, "ab", b, d): "ab" counts as a (the student starts it with a), d stays unmapped.
    vocab = VocabMap(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]))
    s, t = logits_of([0.5, 0.3, 0.2]), logits_of([0.2, 0.5, 0.2, 0.1])
    kl = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert mapped_kl(s, t, vocab, uld_weight=0.0).item() == pytest.approx(kl, abs=1e-12)
    assert mapped_kl(s, t, vocab).item() == pytest.approx(kl + abs(0.2 - 0.1), abs=1e-12)  # rests: c .2, d .1


def test_chunked_with_a_bf16_student_matches_fp32_within_bf16_rounding():
    """A bf16 student's chunks are scored in fp32 (this used to fail: a bf16 chunk gradient met the fp32 weight
    gradient), the gradients come back in bf16, and the loss is the fp32 loss of the same inputs up to the bf16
    rounding of the logits."""
    torch.manual_seed(0)
    hs = torch.randn(12, 16).bfloat16().requires_grad_(True)
    ws = torch.randn(40, 16).bfloat16().requires_grad_(True)
    ht, wt = torch.randn(12, 8), torch.randn(56, 8)
    vocab = VocabMap(torch.arange(30), torch.arange(30))
    loss = chunked_cross_vocab(mapped_kl_per_position, hs, ws, ht, wt, vocab=vocab, chunk_size=5, top_k=16)
    loss.backward()
    assert hs.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.bfloat16
    z = hs.detach().float() @ ws.detach().float().T  # the same inputs' logits in fp32
    want = mapped_kl(z, ht @ wt.T, vocab, top_k=16)
    # bf16 logits are off by at most 2^-8 relative; each term (the KL and ULD) moves by at most twice the largest
    # logit change: at most 4 * 2^-8 * max|z| in all
    assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) <= 4 * 2**-8 * z.abs().max().item()
