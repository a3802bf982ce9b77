"""Chunked LM-head losses equal the plain path (materialised logits + autograd), in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.losses import DIVERGENCES, fused, fused_linear_cross_entropy, fused_linear_divergence
from distil.losses.fused import _KERNELS, _divergence_value_and_grad

CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("skew_reverse_kl", {"alpha": 1.0}),
    ("tvd", {}),
]
IDS = [f"{n}-{p}" for n, p in CASES]


def _heads(b=2, t=13, hs=8, ht=6, v=37, seed=0, dtype=torch.float32, vt=None):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, hs, generator=g, dtype=dtype),
        torch.randn(v, hs, generator=g, dtype=dtype),
        torch.randn(b, t, ht, generator=g, dtype=dtype),
        torch.randn(vt or v, ht, generator=g, dtype=dtype),
    )


def _plain_and_fused(name, params, h_s, w_s, h_t, w_t, temperature=1.0, mask=None, chunk_size=None, **kw):
    out = []
    for fused in (False, True):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        if fused:
            val = fused_linear_divergence(
                hs, ws, h_t, w_t, divergence=name, temperature=temperature, mask=mask, chunk_size=chunk_size,
                **params, **kw,
            )
        else:
            v = kw.get("vocab_size", w_s.shape[0])
            val = DIVERGENCES[name](hs @ ws[:v].T, h_t @ w_t[:v].T, temperature=temperature, mask=mask, **params)
        val.backward()
        out.append((val.detach(), hs.grad, ws.grad))
    return out


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_equals_plain_with_mask_and_ragged_chunks(name, params, row_blocks):
    """In fp64 the fused and plain paths agree to rounding (the same formulas). In fp32 both round, differently:
    the fused value and gradients must be about as close to the fp64 truth as the plain path's own (at most 4x its
    largest error, plus a few ulps of the largest entry), since a fixed tolerance would only record one machine's
    rounding (the gradients cancel: g - p_s * sum(g) subtracts terms far larger than the result)."""
    h_s, w_s, h_t, w_t = _heads()
    mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) > 0.3
    wide = [t.double() for t in (h_s, w_s, h_t, w_t)]
    for chunk_size, m, temperature in [(7, mask, 2.0), (4, None, 1.0), (1000, mask, 0.5), (None, None, 1.0)]:
        exact, fused64 = _plain_and_fused(name, params, *wide, temperature, m, chunk_size)
        for a, b in zip(fused64, exact):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        plain, fused = _plain_and_fused(name, params, h_s, w_s, h_t, w_t, temperature, m, chunk_size)
        for f, p, e in zip(fused, plain, exact):
            plain_error = float((p.double() - e).abs().max())
            fused_error = float((f.double() - e).abs().max())
            assert fused_error <= 4 * plain_error + 8 * torch.finfo(torch.float32).eps * float(e.abs().max()), \
                (chunk_size, temperature, fused_error, plain_error)
        if m is not None:
            assert (fused[1][~m] == 0).all()


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_gradcheck_fp64(name, params, row_blocks):
    h_s, w_s, h_t, w_t = _heads(b=1, t=5, hs=3, ht=4, v=7, seed=2, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, True]])

    def fn(hs, ws):
        return fused_linear_divergence(
            hs, ws, h_t, w_t, divergence=name, temperature=1.5, mask=mask, chunk_size=3, **params
        )

    assert torch.autograd.gradcheck(fn, (h_s.requires_grad_(True), w_s.requires_grad_(True)))


def test_non_contiguous_3d_input():
    g = torch.Generator().manual_seed(3)
    base_s = torch.randn(8, 3, 10, generator=g)  # [H, T, B] -> permuted to [B, T, H]
    h_s = base_s.permute(2, 1, 0)
    h_t = torch.randn(10, 3, 12, generator=g)[:, :, ::2]  # strided last dim
    w_s, w_t = torch.randn(21, 8, generator=g), torch.randn(6, 21, generator=g).T  # non-contiguous weight
    assert not h_s.is_contiguous() and not w_t.is_contiguous()
    (pv, pgh, pgw), (fv, fgh, fgw) = _plain_and_fused("generalized_jsd", {"beta": 0.4}, h_s, w_s, h_t, w_t, 1.3,
                                                       None, 4)
    torch.testing.assert_close(fv, pv)
    torch.testing.assert_close(fgh, pgh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fgw, pgw, rtol=1e-4, atol=1e-6)
    # 2-D column-major hidden states (a transposed tensor): the gradient comes back in the same layout.
    h2 = torch.randn(8, 30, generator=g).T
    (pv, pgh, _), (fv, fgh, _) = _plain_and_fused("forward_kl", {}, h2, w_s, h_t.reshape(30, 6), w_t, 1.0, None, 7)
    torch.testing.assert_close(fv, pv)
    torch.testing.assert_close(fgh, pgh, rtol=1e-4, atol=1e-6)


def test_all_masked_gives_zero_and_zero_grad():
    h_s, w_s, h_t, w_t = _heads()
    hs, ws = h_s.requires_grad_(True), w_s.requires_grad_(True)
    val = fused_linear_divergence(hs, ws, h_t, w_t, mask=torch.zeros(2, 13, dtype=torch.bool), chunk_size=5)
    val.backward()
    assert val.item() == 0.0
    assert torch.equal(hs.grad, torch.zeros_like(hs)) and torch.equal(ws.grad, torch.zeros_like(ws))


@pytest.mark.parametrize("name", ["generalized_jsd", "jsd", "skew_kl", "skew_reverse_kl"])
def test_parameters_default_like_the_plain_functions(name):
    """Without beta / alpha the fused path uses the plain functions' defaults (beta 0.5, alpha 0.1)."""
    h_s, w_s, h_t, w_t = _heads()
    fused = fused_linear_divergence(h_s, w_s, h_t, w_t, divergence=name, temperature=2.0)
    plain = DIVERGENCES[name](h_s @ w_s.T, h_t @ w_t.T, temperature=2.0)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_shared_vocabulary_of_padded_heads():
    h_s, w_s, h_t, w_t = _heads(v=40, vt=37)
    with pytest.raises(DistilError, match="vocab_size"):
        fused_linear_divergence(h_s, w_s, h_t, w_t)
    (pv, pgh, pgw), (fv, fgh, fgw) = _plain_and_fused("reverse_kl", {}, h_s, w_s, h_t, w_t, 1.0, None, 6,
                                                       vocab_size=37)
    torch.testing.assert_close(fv, pv)
    torch.testing.assert_close(fgw, pgw, rtol=1e-4, atol=1e-6)
    assert (fgw[37:] == 0).all()


def test_reduction_sum_eval_mode_and_grad_scaling():
    h_s, w_s, h_t, w_t = _heads()
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 5:] = False
    mean = fused_linear_divergence(h_s, w_s, h_t, w_t, mask=mask, chunk_size=4)
    total = fused_linear_divergence(h_s, w_s, h_t, w_t, mask=mask, chunk_size=4, reduction="sum")
    torch.testing.assert_close(total, mean * mask.sum())
    with torch.no_grad():
        torch.testing.assert_close(
            fused_linear_divergence(h_s.requires_grad_(True), w_s, h_t, w_t, mask=mask, chunk_size=4), mean
        )
    # The incoming gradient scales the stored one, also when combined with another term.
    hs = h_s.detach().requires_grad_(True)
    (2.5 * fused_linear_divergence(hs, w_s, h_t, w_t, chunk_size=4) + hs.sum()).backward()
    hs2 = h_s.detach().requires_grad_(True)
    fused_linear_divergence(hs2, w_s, h_t, w_t, chunk_size=4).backward()
    torch.testing.assert_close(hs.grad, 2.5 * hs2.grad + 1.0)


def test_teacher_gets_no_gradient_and_backward_can_repeat():
    h_s, w_s, h_t, w_t = _heads()
    h_s.requires_grad_(True)
    h_t.requires_grad_(True)
    w_t.requires_grad_(True)
    val = fused_linear_divergence(h_s, w_s, h_t, w_t, divergence="tvd", chunk_size=5)
    val.backward(retain_graph=True)
    assert h_t.grad is None and w_t.grad is None and h_s.grad.abs().sum() > 0
    first = h_s.grad.clone()
    val.backward()
    torch.testing.assert_close(h_s.grad, 2 * first)


def test_bf16_inputs():
    h_s, w_s, h_t, w_t = (x.to(torch.bfloat16) for x in _heads(v=64, seed=4))
    (pv, pgh, pgw), (fv, fgh, fgw) = _plain_and_fused("forward_kl", {}, h_s, w_s, h_t, w_t, 2.0, None, 5)
    assert fv.dtype == torch.float32 and fgh.dtype == torch.bfloat16 and fgw.dtype == torch.bfloat16
    torch.testing.assert_close(fv, pv, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(fgh.float(), pgh.float(), rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(fgw.float(), pgw.float(), rtol=5e-2, atol=2e-3)


def test_autocast_keeps_input_dtypes():
    h_s, w_s, h_t, w_t = _heads(seed=9)
    want = fused_linear_divergence(h_s, w_s, h_t, w_t, chunk_size=5)
    hs = h_s.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_divergence(hs, w_s, h_t, w_t, chunk_size=5)
        ce = fused_linear_cross_entropy(hs, w_s, torch.zeros(2, 13, dtype=torch.long), chunk_size=5)
    (got + ce).backward()
    torch.testing.assert_close(got, want)
    assert hs.grad.dtype == torch.float32 and torch.isfinite(hs.grad).all()


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_chunk_kernel_with_neg_inf_logits_matches_autograd(name, params):
    # Matmul logits are finite in practice; the kernel still follows the plain path's -inf rules exactly.
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    s[:, 0] = t[:, 0] = -math.inf  # excluded by both
    t[:, 3] = -math.inf  # by the teacher only
    s[1, 5] = -math.inf  # by the student only
    x = s.clone().requires_grad_(True)
    want = DIVERGENCES[name](x, t, temperature=1.7, reduction="sum", **params)
    want.backward()
    fn = DIVERGENCES[name]
    val, grad = _divergence_value_and_grad(_KERNELS[fn], params, [s.clone(), t.clone()], 1.7, True)
    torch.testing.assert_close(val, want.detach())
    torch.testing.assert_close(grad, x.grad)
    assert torch.isfinite(grad).all()


def test_tiny_llama_hidden_states_and_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    student, teacher = transformers.LlamaForCausalLM(config).eval(), transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = labels[:, 1:] != -100
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    s_hidden = student.model(input_ids=ids).last_hidden_state[:, :-1]
    fused = fused_linear_divergence(
        s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, divergence="jsd", beta=0.5,
        mask=mask, chunk_size=6,
    )
    plain = DIVERGENCES["jsd"](student(input_ids=ids).logits[:, :-1], t_logits, beta=0.5, mask=mask)
    torch.testing.assert_close(fused, plain)
    ce = fused_linear_cross_entropy(s_hidden, student.lm_head.weight, labels[:, 1:], chunk_size=6)
    logits = student(input_ids=ids).logits[:, :-1]
    torch.testing.assert_close(ce, F.cross_entropy(logits.transpose(1, 2), labels[:, 1:]))


# ------------------------------------------------------------------------------------------- cross-entropy
def test_cross_entropy_equals_plain(row_blocks):
    h_s, w_s, _, _ = _heads(seed=6)
    labels = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(7))
    labels[0, :5] = -100
    for chunk_size in (3, 100, None):
        grads = []
        for fused in (False, True):
            hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
            if fused:
                val = fused_linear_cross_entropy(hs, ws, labels, chunk_size=chunk_size)
            else:
                val = F.cross_entropy((hs @ ws.T).reshape(-1, 37), labels.reshape(-1))
            val.backward()
            grads.append((val.detach(), hs.grad, ws.grad))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cross_entropy_gradcheck_and_all_ignored(row_blocks):
    h_s, w_s, _, _ = _heads(b=1, t=5, hs=3, v=7, seed=8, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 6, 0, 3]])
    assert torch.autograd.gradcheck(
        lambda hs, ws: fused_linear_cross_entropy(hs, ws, labels, chunk_size=2),
        (h_s.requires_grad_(True), w_s.requires_grad_(True)),
    )
    hs = h_s.detach().requires_grad_(True)
    val = fused_linear_cross_entropy(hs, w_s, torch.full((1, 5), -100), chunk_size=2)
    val.backward()
    assert val.item() == 0.0 and torch.equal(hs.grad, torch.zeros_like(hs))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_distil_error():
    h_s, w_s, h_t, w_t = _heads()
    with pytest.raises(DistilError, match="unknown divergence"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, divergence="kl")
    with pytest.raises(DistilError, match="no parameter beta"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, divergence="forward_kl", beta=0.5)
    with pytest.raises(DistilError, match="beta"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, divergence="jsd", beta=2.0)
    with pytest.raises(DistilError, match="reduction"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, reduction="none")
    with pytest.raises(DistilError, match="different positions"):
        fused_linear_divergence(h_s, w_s, h_t[:, :5], w_t)
    with pytest.raises(DistilError, match=r"\[vocab, hidden\]"):
        fused_linear_divergence(h_s, w_s.T, h_t, w_t)
    with pytest.raises(DistilError, match="cast"):
        fused_linear_divergence(h_s.double(), w_s, h_t, w_t)
    with pytest.raises(DistilError, match="mask"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, mask=torch.ones(2, 13))
    with pytest.raises(DistilError, match="temperature"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, temperature=-1.0)
    with pytest.raises(DistilError, match="chunk_size"):
        fused_linear_divergence(h_s, w_s, h_t, w_t, chunk_size=0)
    with pytest.raises(DistilError, match="labels must lie"):
        fused_linear_cross_entropy(h_s, w_s, torch.full((2, 13), 37))


@pytest.mark.parametrize("name", ["jsd", "generalized_jsd", "skew_kl", "skew_reverse_kl"])
def test_fused_parameters_default_to_the_plain_functions(name):
    """Without beta / alpha the fused path uses the plain function's defaults (both read the losses registry)."""
    torch.manual_seed(0)
    h_s, w_s, h_t, w_t = torch.randn(5, 4), torch.randn(7, 4), torch.randn(5, 3), torch.randn(7, 3)
    fused = fused_linear_divergence(h_s, w_s, h_t, w_t, divergence=name)
    plain = DIVERGENCES[name](h_s @ w_s.T, h_t @ w_t.T)
    assert torch.allclose(fused, plain, atol=1e-6)


def test_row_blocks_cover_the_chunk_in_order_and_one_block_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 80)
    cpu = list(fused._row_blocks(7, 37, torch.device("cpu")))
    assert [(s.start, s.stop) for s in cpu] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [(s.start, s.stop) for s in fused._row_blocks(7, 37, torch.device("cuda"))] == [(0, 7)]
    assert [(s.start, s.stop) for s in fused._row_blocks(3, 1000, torch.device("cpu"))] == [(0, 1), (1, 2), (2, 3)]
