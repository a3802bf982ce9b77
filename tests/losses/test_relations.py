import math

import pytest
import torch

from distil.errors import DistilError
from distil.losses.relations import rkd_angle, rkd_distance


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _dist_ref(s, t):
    def norm_d(e):
        n = len(e)
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[x / mean for x in row] for row in d]
    ds, dt = norm_d(s.tolist()), norm_d(t.tolist())
    n = len(ds)
    return sum(_huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / (n * n)


def _angle_ref(s, t):
    def cosines(e):
        n = len(e)
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u = [a - b for a, b in zip(e[j], e[i])]
                    v = [a - b for a, b in zip(e[k], e[i])]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv))
        return out
    cs, ct = cosines(s.tolist()), cosines(t.tolist())
    return sum(_huber(a, b) for a, b in zip(cs, ct)) / len(cs)


def _emb(n, d, seed, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_pinned_to_reference(scale):
    s, t = _emb(6, 4, 0, scale), _emb(6, 9, 1)
    assert rkd_distance(s, t).item() == pytest.approx(_dist_ref(s, t), rel=1e-5)
    assert rkd_angle(s, t).item() == pytest.approx(_angle_ref(s, t), rel=1e-5)


def test_zero_for_identical_inputs():
    e = _emb(5, 7, 2)
    assert rkd_distance(e, e).item() == pytest.approx(0.0, abs=1e-7)
    assert rkd_angle(e, e).item() == pytest.approx(0.0, abs=1e-7)


def test_invariant_to_width_rotation_scale_and_translation():
    s, t = _emb(6, 5, 3), _emb(6, 8, 4)
    d0, a0 = rkd_distance(s, t), rkd_angle(s, t)
    # an isometric embedding into a wider space (orthonormal columns) keeps every distance and angle
    q, _ = torch.linalg.qr(torch.randn(20, 8, dtype=torch.float64))
    wide_t = (t.double() @ q.t()).float()
    assert wide_t.shape == (6, 20)
    torch.testing.assert_close(rkd_distance(s, wide_t), d0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkd_angle(s, wide_t), a0, rtol=1e-5, atol=1e-6)
    # duplicating features scales every distance by sqrt(2): removed by the mean-distance normalisation
    dup = torch.cat([s, s], dim=1)
    torch.testing.assert_close(rkd_distance(dup, t), d0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkd_angle(dup, t), a0, rtol=1e-5, atol=1e-6)
    moved = s * 4.0 + torch.randn(1, 5)
    torch.testing.assert_close(rkd_distance(moved, t), d0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkd_angle(moved, t), a0, rtol=1e-5, atol=1e-6)
    # extra dims are flattened: [N, 2, 4] is the same as [N, 8]
    torch.testing.assert_close(rkd_distance(s, t.view(6, 2, 4)), d0)


def test_gradcheck_float64():
    s = _emb(5, 3, 5).double().requires_grad_()
    t = _emb(5, 4, 6).double().requires_grad_()
    assert torch.autograd.gradcheck(rkd_distance, (s, t))
    assert torch.autograd.gradcheck(rkd_angle, (s, t))


def test_errors():
    with pytest.raises(DistilError, match="batch"):
        rkd_distance(_emb(4, 3, 0), _emb(5, 3, 0))
    with pytest.raises(DistilError, match="at least 2"):
        rkd_angle(_emb(1, 3, 0), _emb(1, 3, 0))
