import math

import pytest
import torch

from distil.errors import DistilError
from distil.losses.features import attention_transfer, fitnets_hint, hidden_cosine, hidden_mse


def test_hidden_mse_pinned_with_mask():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]])
    t = torch.tensor([[[0.0, 2.0], [5.0, 5.0], [1.0, 1.0]]])
    # per position: (1 + 0)/2 = 0.5, (25 + 25)/2 = 25, (4 + 4)/2 = 4
    assert hidden_mse(s, t).item() == pytest.approx((0.5 + 25 + 4) / 3)
    mask = torch.tensor([[1, 0, 1]])
    assert hidden_mse(s, t, mask=mask).item() == pytest.approx((0.5 + 4) / 2)
    assert hidden_mse(s, t, mask=mask.bool()).item() == pytest.approx(2.25)


def test_hidden_cosine_pinned():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    # cosines 0, 1, -1 -> 1 - cos = 1, 0, 2
    assert hidden_cosine(s, t).item() == pytest.approx(1.0)
    assert hidden_cosine(s, t, mask=torch.tensor([False, True, True])).item() == pytest.approx(1.0)
    assert hidden_cosine(s, t, mask=torch.tensor([True, True, False])).item() == pytest.approx(0.5)
    # scale invariant per position
    assert hidden_cosine(s * 7, t * 0.1).item() == pytest.approx(1.0)


def test_fitnets_hint_is_the_elementwise_mean_square():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ref = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
    assert fitnets_hint(s, t).item() == pytest.approx(ref, rel=1e-6)


def _at_reference(s, t, p):
    total = 0.0
    for n in range(s.shape[0]):
        qs = [sum(abs(s[n, c, i, j].item()) ** p for c in range(s.shape[1]))
              for i in range(s.shape[2]) for j in range(s.shape[3])]
        qt = [sum(abs(t[n, c, i, j].item()) ** p for c in range(t.shape[1]))
              for i in range(t.shape[2]) for j in range(t.shape[3])]
        ns, nt = math.sqrt(sum(x * x for x in qs)), math.sqrt(sum(x * x for x in qt))
        total += math.sqrt(sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt)))
    return total / s.shape[0]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_attention_transfer_pinned_across_channel_counts(p):
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 3, 5), torch.randn(3, 9, 3, 5)
    assert attention_transfer(s, t, p=p).item() == pytest.approx(_at_reference(s, t, p), rel=1e-5)


def test_attention_transfer_invariances():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6)
    base = attention_transfer(s, t)
    torch.testing.assert_close(attention_transfer(s * 13.0, t * 0.01), base)
    torch.testing.assert_close(attention_transfer(-s, t), base)
    # the map sums channels, then normalises: duplicating every channel changes nothing
    torch.testing.assert_close(attention_transfer(torch.cat([s, s], dim=1), t), base)
    # per-sample normalisation: scaling one sample alone changes nothing either
    s2 = s.clone()
    s2[0] *= 5
    torch.testing.assert_close(attention_transfer(s2, t), base)
    assert attention_transfer(t * 3, t).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_for_identical_inputs():
    torch.manual_seed(3)
    h = torch.randn(2, 5, 8)
    assert hidden_mse(h, h).item() == 0.0
    assert hidden_cosine(h, h).item() == pytest.approx(0.0, abs=1e-6)
    assert fitnets_hint(h, h).item() == 0.0
    f = torch.randn(2, 3, 4, 4)
    assert attention_transfer(f, f).item() == pytest.approx(0.0, abs=1e-7)


def test_all_masked_gives_zero_with_zero_gradient():
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for fn in (hidden_mse, hidden_cosine):
        loss = fn(s, t, mask=mask)
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(s))


def test_gradcheck_float64():
    torch.manual_seed(4)
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(lambda a, b: hidden_mse(a, b, mask=mask), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: hidden_cosine(a, b, mask=mask), (s, t))
    assert torch.autograd.gradcheck(fitnets_hint, (s, t))
    fs = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention_transfer, (fs, ft))
    assert torch.autograd.gradcheck(lambda a, b: attention_transfer(a, b, p=3), (fs, ft))


def test_identical_maps_have_finite_zero_gradient():
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    attention_transfer(f, f.detach()).backward()
    assert torch.isfinite(f.grad).all()


def test_low_precision_inputs_accumulate_in_fp32():
    torch.manual_seed(5)
    s, t = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    out = hidden_mse(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hidden_mse(s.bfloat16().float(), t.bfloat16().float()))


def test_shape_errors_name_both_shapes():
    with pytest.raises(DistilError, match=r"student shape \[2, 3, 4\] != teacher shape \[2, 3, 8\]"):
        hidden_mse(torch.zeros(2, 3, 4), torch.zeros(2, 3, 8))
    with pytest.raises(DistilError, match="mask shape"):
        hidden_mse(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(2, 4))
    with pytest.raises(DistilError, match="spatial"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
