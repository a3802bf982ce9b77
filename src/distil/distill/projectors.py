"""Projectors: learned maps from the student's feature width to the teacher's, one per distilled layer pair.

- Hidden states [..., Hs] -> [..., Ht]: a linear map (with bias) on the last dimension; all leading dimensions
  (batch, sequence) must already agree.
- Feature maps [N, Cs, hs, ws] -> [N, Ct, ht, wt]: a 1x1 convolution, then, if the spatial sizes differ, the map is
  resized to the teacher's: adaptive average pooling when the student map is at least as large in both dimensions
  (exact block averages for integer factors), bilinear interpolation otherwise. Both resizes are linear and act per
  channel, so their order with the 1x1 convolution does not change the result.

A projector between equal shapes starts as the identity, so asking for one never perturbs the initial loss.
`Projectors` is an nn.Module of its own (an nn.ModuleDict keyed by pair name): the loop optimises it with the student
and saves its state_dict in checkpoints, but it is never attached to the student, so exports never contain it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distil.errors import DistilError

Mode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class FeaturePair:
    """One distilled pair: module names and the feature shapes seen in a pre-flight forward pass."""

    student_layer: str
    teacher_layer: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    kind: Literal["linear", "conv"] | None = None  # None: conv for 4-D feature maps, linear otherwise

    @property
    def name(self) -> str:
        return f"{self.student_layer}->{self.teacher_layer}"


class LinearProjector(nn.Linear):
    """[..., in_features] -> [..., out_features]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        if in_features == out_features:
            with torch.no_grad():
                self.weight.copy_(torch.eye(in_features))
                self.bias.zero_()


class ConvProjector(nn.Module):
    """[N, Cs, hs, ws] -> [N, Ct, h, w]: 1x1 convolution, then resize to (h, w) when the sizes differ."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.size = (int(size[0]), int(size[1]))
        if in_channels == out_channels:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(in_channels)[:, :, None, None])
                self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        h, w = x.shape[-2:]
        if (h, w) == self.size:
            return x
        if h >= self.size[0] and w >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _key(pair_name: str) -> str:
    # ModuleDict keys cannot contain "."; module names always do.
    return pair_name.replace(".", ":")


def _kind(pair: FeaturePair) -> str:
    if pair.kind is not None:
        if pair.kind not in ("linear", "conv"):
            raise DistilError(f"projector kind for {pair.name} must be 'linear' or 'conv', got {pair.kind!r}")
        return pair.kind
    return "conv" if len(pair.student_shape) == 4 else "linear"


def _describe(pair: FeaturePair) -> str:
    return (f"student {pair.student_layer} {list(pair.student_shape)} vs teacher {pair.teacher_layer} "
            f"{list(pair.teacher_shape)}")


def _check_projectable(pair: FeaturePair, kind: str) -> None:
    s, t = pair.student_shape, pair.teacher_shape
    if kind == "linear":
        if len(s) != len(t) or len(s) < 1 or s[:-1] != t[:-1]:
            raise DistilError(f"cannot project {_describe(pair)}: a linear projector maps only the last dimension, "
                              "so all other dimensions must already agree (same batch and sequence length)")
    else:
        if len(s) != 4 or len(t) != 4 or s[0] != t[0]:
            raise DistilError(f"cannot project {_describe(pair)}: a conv projector needs [N, C, h, w] feature maps "
                              "with the same batch size on both sides")


class Projectors(nn.Module):
    """The projectors of one distillation run, keyed by pair name ("student_layer->teacher_layer").

    `project(pair_name, x)` applies the pair's projector, or returns x unchanged when the pair has none."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleDict()
        self._specs: dict[str, dict[str, Any]] = {}

    def add(self, pair: FeaturePair) -> nn.Module:
        kind = _kind(pair)
        _check_projectable(pair, kind)
        if pair.name in self._specs:
            raise DistilError(f"a projector for {pair.name} already exists; each layer pair gets one projector")
        if kind == "linear":
            module: nn.Module = LinearProjector(pair.student_shape[-1], pair.teacher_shape[-1])
            spec = {"kind": "linear", "in": pair.student_shape[-1], "out": pair.teacher_shape[-1]}
        else:
            size = (pair.teacher_shape[2], pair.teacher_shape[3])
            module = ConvProjector(pair.student_shape[1], pair.teacher_shape[1], size)
            spec = {"kind": "conv", "in": pair.student_shape[1], "out": pair.teacher_shape[1], "size": list(size)}
        self.maps[_key(pair.name)] = module
        self._specs[pair.name] = spec
        return module

    def __contains__(self, pair_name: object) -> bool:
        return pair_name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def project(self, pair_name: str, x: torch.Tensor) -> torch.Tensor:
        if pair_name not in self._specs:
            return x
        return self.maps[_key(pair_name)](x)

    def forward(self, pair_name: str, x: torch.Tensor) -> torch.Tensor:
        return self.project(pair_name, x)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able description (pair, kind, widths, size) for checkpoints and the run log; see `from_description`."""
        return [{"pair": name, **spec} for name, spec in self._specs.items()]

    @classmethod
    def from_description(cls, description: Sequence[dict[str, Any]]) -> Projectors:
        """Rebuild the same modules (fresh weights) so that a saved state_dict loads into them."""
        out = cls()
        for item in description:
            s_layer, _, t_layer = item["pair"].partition("->")
            if item["kind"] == "linear":
                pair = FeaturePair(s_layer, t_layer, (item["in"],), (item["out"],), "linear")
            else:
                h, w = item["size"]
                pair = FeaturePair(s_layer, t_layer, (1, item["in"], h, w), (1, item["out"], h, w), "conv")
            out.add(pair)
        return out


def build_projectors(pairs: Sequence[FeaturePair], *, mode: Mode = "auto") -> Projectors:
    """Pre-flight: create the projectors a run needs, or fail with one clear line before any training.

    mode "auto": a projector for each pair whose shapes differ; "always": for every pair; "never": none, and any
    shape mismatch raises DistilError naming both layers and both shapes.
    """
    if mode not in ("auto", "always", "never"):
        raise DistilError(f"projector mode must be 'auto', 'always' or 'never', got {mode!r}")
    projectors = Projectors()
    for pair in pairs:
        same = tuple(pair.student_shape) == tuple(pair.teacher_shape)
        if mode == "never":
            if not same:
                raise DistilError(f"feature shapes differ with projectors disabled: {_describe(pair)}; "
                                  "enable projectors or choose layers of equal width")
            continue
        if same and mode == "auto":
            continue
        projectors.add(pair)
    return projectors
