import math

import pytest
import torch

from distil.errors import DistilError
from distil.losses.attention import attention_kl, minilm_relations


def _probs(*shape, causal=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=g, dtype=dtype) * 2
    if causal:
        q, k = shape[-2:]
        scores = scores.masked_fill(~torch.ones(q, k, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def _kl_ref(t_row, s_row):
    return sum(t * (math.log(t) - math.log(s)) for t, s in zip(t_row, s_row) if t > 0)


def _attention_kl_ref(s, t, mask, groups):
    """groups[h]: teacher heads averaged for student head h (student heads averaged too when groups is None)."""
    b, hs, q, _ = s.shape
    vals = []
    for i in range(b):
        for h in range(len(groups) if groups is not None else 1):
            for j in range(q):
                if mask is not None and not mask[i][j]:
                    continue
                if groups is None:
                    s_row = s[i, :, j].mean(0).tolist()
                    t_row = t[i, :, j].mean(0).tolist()
                else:
                    s_row = s[i, h, j].tolist()
                    t_row = t[i, groups[h], j].mean(0).tolist()
                vals.append(_kl_ref(t_row, s_row))
    return sum(vals) / len(vals)


def test_attention_kl_pinned_per_head_average_and_map():
    s = _probs(2, 4, 5, 5, causal=True, seed=1)
    t = _probs(2, 4, 5, 5, causal=True, seed=2)
    mask = [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    m = torch.tensor(mask)
    got = attention_kl(s, t, head_map="per_head", mask=m).item()
    assert got == pytest.approx(_attention_kl_ref(s, t, mask, [[h] for h in range(4)]), rel=1e-5)
    got = attention_kl(s, t, mask=m).item()
    assert got == pytest.approx(_attention_kl_ref(s, t, mask, None), rel=1e-5)
    # different head counts: a 2-head student against a 6-head teacher
    t6 = _probs(2, 6, 5, 5, causal=True, seed=3)
    s2 = s[:, :2].contiguous()
    got = attention_kl(s2, t6, head_map=[[0, 1, 2], [3, 4, 5]]).item()
    assert got == pytest.approx(_attention_kl_ref(s2, t6, None, [[0, 1, 2], [3, 4, 5]]), rel=1e-5)
    got = attention_kl(s2, t6, head_map=[5, 0]).item()
    assert got == pytest.approx(_attention_kl_ref(s2, t6, None, [[5], [0]]), rel=1e-5)
    got = attention_kl(s2, t6).item()
    assert got == pytest.approx(_attention_kl_ref(s2, t6, None, None), rel=1e-5)


def test_attention_kl_zero_identical_and_masked_rows_ignored():
    p = _probs(2, 3, 4, 4, causal=True)
    assert attention_kl(p, p, head_map="per_head").item() == pytest.approx(0.0, abs=1e-7)
    q = _probs(2, 3, 4, 4, causal=True, seed=9)
    mixed = p.clone()
    mixed[:, :, 2] = q[:, :, 2]  # rows of query 2 differ, and they are masked out
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1]])
    assert attention_kl(mixed, p, mask=mask, head_map="per_head").item() == pytest.approx(0.0, abs=1e-7)
    assert attention_kl(mixed, p, head_map="per_head").item() > 1e-3


def test_attention_kl_all_masked_and_zero_probabilities_have_finite_gradients():
    s = _probs(1, 2, 4, 4, causal=True).requires_grad_()
    t = _probs(1, 2, 4, 4, causal=True, seed=5)
    loss = attention_kl(s, t, mask=torch.zeros(1, 4), head_map="per_head")
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(s))
    loss = attention_kl(s, t, head_map="per_head")
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_attention_kl_gradcheck_float64():
    s_logits = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    for head_map in ("average", [[0, 1], [2, 3]]):
        fn = lambda a, b: attention_kl(a.softmax(-1), b.softmax(-1), mask=mask, head_map=head_map)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s_logits, t_logits))


def test_attention_kl_errors():
    s, t = _probs(1, 2, 3, 3), _probs(1, 4, 3, 3)
    with pytest.raises(DistilError, match="equal head counts"):
        attention_kl(s, t, head_map="per_head")
    with pytest.raises(DistilError, match="one non-empty teacher head"):
        attention_kl(s, t, head_map=[0])
    with pytest.raises(DistilError, match="teacher heads \\[7\\]"):
        attention_kl(s, t, head_map=[0, 7])
    with pytest.raises(DistilError, match="sequence length"):
        attention_kl(s, _probs(1, 2, 4, 4))
    with pytest.raises(DistilError, match="unknown head_map"):
        attention_kl(s, t, head_map="mean")


# -- MiniLMv2 relations ---------------------------------------------------------------------------------------

def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _relations_ref(s_list, t_list, r, mask):
    total = 0.0
    for s, t in zip(s_list, t_list):
        b, n, _ = s.shape
        vals = []
        for i in range(b):
            keep = [j for j in range(n) if mask is None or mask[i][j]]
            for h in range(r):
                rows = []
                for x in (s, t):
                    d = x.shape[2] // r
                    xs = x[i, :, h * d:(h + 1) * d].tolist()
                    rel = {a: _softmax([sum(u * v for u, v in zip(xs[a], xs[c])) / math.sqrt(d) for c in keep])
                           for a in keep}
                    rows.append(rel)
                vals += [_kl_ref(rows[1][a], rows[0][a]) for a in keep]
        total += sum(vals) / len(vals)
    return total


def _qkv(b, n, widths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, w, generator=g) for w in widths]


def test_minilm_relations_pinned_across_widths():
    s = _qkv(2, 5, (8, 4, 4), seed=0)  # GQA-like student: narrower keys and values
    t = _qkv(2, 5, (12, 12, 12), seed=1)
    mask = [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    got = minilm_relations(s, t, num_relation_heads=2, mask=torch.tensor(mask)).item()
    assert got == pytest.approx(_relations_ref(s, t, 2, mask), rel=1e-5)
    got = minilm_relations(s, t, num_relation_heads=4).item()
    assert got == pytest.approx(_relations_ref(s, t, 4, None), rel=1e-5)


def test_minilm_relations_zero_for_identical_and_padding_content_ignored():
    x = _qkv(2, 6, (8, 8, 8), seed=2)
    assert minilm_relations(x, x, num_relation_heads=4).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    noisy = [v.clone() for v in x]
    for v in noisy:
        v[0, 4:] = torch.randn(2, 8) * 10  # padded tokens: neither queries nor keys
    assert minilm_relations(noisy, x, num_relation_heads=2, mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    assert minilm_relations(noisy, x, num_relation_heads=2).item() > 1e-3


def test_minilm_relations_invariances():
    s = _qkv(2, 5, (8, 8, 8), seed=3)
    t = _qkv(2, 5, (12, 12, 12), seed=4)
    r = 2
    base = minilm_relations(s, t, num_relation_heads=r)
    # a rotation inside each relation head leaves X_r X_r^T, hence the loss, unchanged
    rot = [torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0].float() for _ in range(r)]
    rotated = [torch.cat([x[..., h * 6:(h + 1) * 6] @ rot[h] for h in range(r)], dim=-1) for x in t]
    torch.testing.assert_close(minilm_relations(s, rotated, num_relation_heads=r), base)

    # width: each relation head copied 4 times and scaled by 1/sqrt(2) keeps X_r X_r^T / sqrt(d_r) exactly,
    # so a 4x wider student with the same relations has the same loss
    def widen(x):
        return torch.cat([x[..., h * 4:(h + 1) * 4].repeat(1, 1, 4) / math.sqrt(2) for h in range(r)], dim=-1)
    wide = [widen(x) for x in s]
    assert wide[0].shape[-1] == 32
    torch.testing.assert_close(minilm_relations(wide, t, num_relation_heads=r), base)
    # the sum over Q-Q, K-K, V-V terms
    parts = sum(minilm_relations([a], [b], num_relation_heads=r) for a, b in zip(s, t))
    torch.testing.assert_close(parts, base)


def test_minilm_relations_gradcheck_and_all_masked():
    s = [x.double().requires_grad_() for x in _qkv(1, 4, (4, 4), seed=5)]
    t = [x.double() for x in _qkv(1, 4, (6, 6), seed=6)]
    mask = torch.tensor([[1, 1, 0, 1]])
    assert torch.autograd.gradcheck(lambda a, b: minilm_relations([a, b], t, num_relation_heads=2, mask=mask),
                                    tuple(s))
    loss = minilm_relations(s, t, num_relation_heads=2, mask=torch.zeros(1, 4))
    grads = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_minilm_relations_errors():
    s, t = _qkv(1, 4, (6, 6, 6), seed=0), _qkv(1, 4, (8, 8, 8), seed=1)
    with pytest.raises(DistilError, match="student width 6 is not divisible by num_relation_heads=4"):
        minilm_relations(s, t, num_relation_heads=4)
    with pytest.raises(DistilError, match="same non-zero number"):
        minilm_relations(s[:2], t, num_relation_heads=2)
    with pytest.raises(DistilError, match="same batch and sequence length"):
        minilm_relations(s, _qkv(1, 5, (8, 8, 8), seed=1), num_relation_heads=2)
