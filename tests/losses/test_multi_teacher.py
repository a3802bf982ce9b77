import math

import pytest
import torch

from distil.errors import DistilError
from distil.losses.features import hidden_mse
from distil.losses.multi_teacher import combine_teacher_logits, combine_teacher_logprobs, per_teacher_loss


def _mixture_ref(logits_list, weights, temperature):
    out = []
    for pos in range(logits_list[0].shape[0]):
        mix = None
        for z, w in zip(logits_list, weights):
            row = [x / temperature for x in z[pos].tolist()]
            m = max(row)
            e = [math.exp(x - m) for x in row]
            p = [w / sum(weights) * v / sum(e) for v in e]
            mix = p if mix is None else [a + b for a, b in zip(mix, p)]
        out.append([math.log(x) for x in mix])
    return torch.tensor(out, dtype=torch.float64)


def _logits(seed, shape=(4, 6), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_weighted_mixture_pinned(temperature):
    zs = [_logits(0), _logits(1), _logits(2)]
    got = combine_teacher_logprobs(zs, [1.0, 2.0, 5.0], temperature=temperature)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _mixture_ref(zs, [1.0, 2.0, 5.0], temperature), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(4))
    eq = combine_teacher_logprobs(zs, temperature=temperature)
    torch.testing.assert_close(eq.double(), _mixture_ref(zs, [1, 1, 1], temperature), rtol=1e-5, atol=1e-5)


def test_single_teacher_zero_weight_and_logits_form():
    z, other = _logits(3), _logits(4)
    torch.testing.assert_close(combine_teacher_logprobs([z], temperature=2.0), (z / 2).log_softmax(-1))
    torch.testing.assert_close(combine_teacher_logprobs([z, other], [1.0, 0.0]), z.log_softmax(-1))
    # extreme logits stay finite in log space
    big = combine_teacher_logprobs([z * 1000, other * 1000])
    assert torch.isfinite(big).all()
    mix = combine_teacher_logprobs([z, other], [0.3, 0.7], temperature=4.0).exp()
    as_logits = combine_teacher_logits([z, other], [0.3, 0.7], temperature=4.0)
    torch.testing.assert_close((as_logits / 4.0).softmax(-1), mix)


def test_gradcheck_float64():
    a = _logits(5, (3, 4)).double().requires_grad_()
    b = _logits(6, (3, 4)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: combine_teacher_logprobs([x, y], [0.2, 0.8], temperature=1.5),
                                    (a, b))


def test_per_teacher_loss():
    s = _logits(7)
    ts = [_logits(8), _logits(9)]
    got = per_teacher_loss(hidden_mse, s, ts, [1.0, 3.0])
    torch.testing.assert_close(got, 0.25 * hidden_mse(s, ts[0]) + 0.75 * hidden_mse(s, ts[1]))
    mask = torch.tensor([1, 0, 1, 1])
    torch.testing.assert_close(per_teacher_loss(hidden_mse, s, ts, mask=mask),
                               0.5 * hidden_mse(s, ts[0], mask=mask) + 0.5 * hidden_mse(s, ts[1], mask=mask))


def test_errors():
    z = _logits(0)
    with pytest.raises(DistilError, match="2 teacher weights for 1 teachers"):
        combine_teacher_logprobs([z], [0.5, 0.5])
    with pytest.raises(DistilError, match="not all zero"):
        combine_teacher_logprobs([z, z], [0.0, 0.0])
    with pytest.raises(DistilError, match="non-negative"):
        combine_teacher_logprobs([z, z], [-1.0, 2.0])
    with pytest.raises(DistilError, match="non-negative"):
        combine_teacher_logprobs([z, z], [float("nan"), 2.0])
    with pytest.raises(DistilError, match="same vocabulary"):
        combine_teacher_logprobs([z, _logits(1, (4, 7))])
    with pytest.raises(DistilError, match="temperature"):
        combine_teacher_logprobs([z], temperature=0.0)
    with pytest.raises(DistilError, match="at least one"):
        combine_teacher_logprobs([])
