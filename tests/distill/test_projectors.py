import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from distil.distill.projectors import (ConvProjector, FeaturePair, LinearProjector, Projectors,
                                       build_projectors)
from distil.errors import DistilError
from distil.losses.features import hidden_mse


def test_linear_projector_maps_the_last_dimension():
    torch.manual_seed(0)
    p = LinearProjector(8, 12)
    x = torch.randn(2, 5, 8)
    y = p(x)
    assert y.shape == (2, 5, 12)
    torch.testing.assert_close(y, x @ p.weight.t() + p.bias)
    same = LinearProjector(8, 8)
    torch.testing.assert_close(same(x), x)  # equal widths start at the identity


def test_conv_projector_channels_and_spatial_resize():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    down = ConvProjector(3, 5, (4, 4))
    y = down(x)
    assert y.shape == (2, 5, 4, 4)
    # a 1x1 conv commutes with average pooling (pooling weights sum to 1): the reference pools first
    ref = F.conv2d(F.avg_pool2d(x, 2), down.conv.weight, down.conv.bias)
    torch.testing.assert_close(y, ref)
    up = ConvProjector(3, 3, (16, 12))
    y = up(x)
    assert y.shape == (2, 3, 16, 12)
    torch.testing.assert_close(y, F.interpolate(x, size=(16, 12), mode="bilinear", align_corners=False))
    same = ConvProjector(3, 3, (8, 8))
    torch.testing.assert_close(same(x), x)


def test_build_projectors_modes_and_preflight_errors():
    pairs = [
        FeaturePair("model.layers.0", "model.layers.1", (2, 7, 32), (2, 7, 64)),
        FeaturePair("model.layers.1", "model.layers.3", (2, 7, 64), (2, 7, 64)),
        FeaturePair("features.4", "layer3", (2, 16, 8, 8), (2, 64, 4, 4)),
    ]
    auto = build_projectors(pairs, mode="auto")
    assert len(auto) == 2 and pairs[0].name in auto and pairs[1].name not in auto
    assert isinstance(auto.maps[pairs[2].name.replace(".", ":")], ConvProjector)
    assert len(build_projectors(pairs, mode="always")) == 3
    x = torch.randn(2, 7, 64)
    assert auto.project(pairs[1].name, x) is x  # no projector: unchanged
    assert auto(pairs[0].name, torch.randn(2, 7, 32)).shape == (2, 7, 64)
    assert auto.project(pairs[2].name, torch.randn(2, 16, 8, 8)).shape == (2, 64, 4, 4)
    with pytest.raises(DistilError) as err:
        build_projectors(pairs, mode="never")
    msg = str(err.value)
    assert "model.layers.0 [2, 7, 32]" in msg and "model.layers.1 [2, 7, 64]" in msg
    assert len(build_projectors(pairs[1:2], mode="never")) == 0
    with pytest.raises(DistilError, match="all other dimensions must already agree"):
        build_projectors([FeaturePair("a", "b", (2, 7, 32), (2, 9, 64))])
    with pytest.raises(DistilError, match="already exists"):
        build_projectors([pairs[0], pairs[0]])
    with pytest.raises(DistilError, match="mode"):
        build_projectors(pairs, mode="sometimes")


def test_trained_with_student_saved_in_checkpoint_absent_from_export(tmp_path):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
    teacher = nn.Sequential(nn.Linear(4, 10), nn.Tanh())
    pair = FeaturePair("1", "1", (3, 6), (3, 10))
    projectors = build_projectors([pair])
    student_keys = set(student.state_dict())
    opt = torch.optim.SGD(list(student.parameters()) + list(projectors.parameters()), lr=0.1)
    x = torch.randn(3, 4)
    before = [p.detach().clone() for p in projectors.parameters()]
    with torch.no_grad():
        t = teacher(x)
    loss = hidden_mse(projectors.project(pair.name, student[:2](x)), t)
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, projectors.parameters()))
    # the exported student is the student alone
    assert set(student.state_dict()) == student_keys
    assert not any("maps" in k or "proj" in k for k in student.state_dict())
    # the checkpoint holds projectors as their own safetensors state, and they rebuild from their description
    save_file(projectors.state_dict(), tmp_path / "projectors.safetensors")
    rebuilt = Projectors.from_description(projectors.describe())
    rebuilt.load_state_dict(load_file(tmp_path / "projectors.safetensors"))
    h = torch.randn(3, 6)
    torch.testing.assert_close(rebuilt.project(pair.name, h), projectors.project(pair.name, h))
    assert projectors.describe() == [{"pair": "1->1", "kind": "linear", "in": 6, "out": 10}]


def test_conv_description_roundtrip():
    pair = FeaturePair("s.conv", "t.conv", (2, 8, 6, 6), (2, 16, 3, 3))
    p = build_projectors([pair])
    r = Projectors.from_description(p.describe())
    r.load_state_dict(p.state_dict())
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(r.project(pair.name, x), p.project(pair.name, x))
