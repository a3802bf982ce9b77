"""Feature losses: hidden-state MSE and cosine, FitNets hints, attention transfer (AT).

Pure functions, arguments (student, teacher, ...). Projection to the teacher's width is the caller's job
(distil.distill.projectors), so these functions see tensors of equal shape (AT excepted: it compares maps across
channel counts). Values are computed in float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.errors import DistilError


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise DistilError(f"{what}: student shape {list(student.shape)} != teacher shape {list(teacher.shape)}; "
                          "add a projector for this layer pair or choose layers of equal width")


def _position_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-position value over the positions `mask` keeps; 0 with zero gradient when none is kept."""
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise DistilError(f"mask shape {list(mask.shape)} does not match the leading feature dimensions "
                          f"{list(per_position.shape)}")
    keep = mask.bool()
    total = torch.where(keep, per_position, torch.zeros_like(per_position)).sum()
    return total / keep.sum().clamp_min(1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between hidden states [..., H], averaged over features and the positions `mask` keeps.

    `mask` has the leading shape [...] (e.g. [B, S]); True/1 keeps a position."""
    _same_shape(student, teacher, "hidden_mse")
    per_position = (_float(student) - _float(teacher)).pow(2).mean(dim=-1)
    return _position_mean(per_position, mask)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity along the last dimension, averaged over the positions `mask` keeps.

    A zero vector has cosine 0 with anything (torch's eps=1e-8 convention)."""
    _same_shape(student, teacher, "hidden_cosine")
    per_position = 1.0 - F.cosine_similarity(_float(student), _float(teacher), dim=-1, eps=1e-8)
    return _position_mean(per_position, mask)


def fitnets_hint(student_hint: torch.Tensor, teacher_guided: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015): MSE between the projected student hint and the teacher's guided layer.

    The paper writes 1/2 * ||u_h - r(v_g)||^2 summed; the mean over all elements is used here so that the weight
    does not depend on the layer's size. `student_hint` is already projected by the regressor r (a projector)."""
    _same_shape(student_hint, teacher_guided, "fitnets_hint")
    return (_float(student_hint) - _float(teacher_guided)).pow(2).mean()


def attention_map(fmap: torch.Tensor, *, p: float = 2) -> torch.Tensor:
    """Spatial attention map of AT: sum_c |A_c|^p, flattened and L2-normalised per sample -> [N, h*w]."""
    if fmap.dim() < 3:
        raise DistilError(f"attention transfer needs feature maps [N, C, ...spatial], got shape {list(fmap.shape)}")
    a = _float(fmap).abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1, eps=1e-12)


def attention_transfer(student_fmap: torch.Tensor, teacher_fmap: torch.Tensor, *, p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, eq. 2): L2 distance between normalised attention maps.

    Per sample, || Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2 ||_2 with Q = vec(sum_c |A_c|^p); averaged over the batch. The
    paper's beta/2 factor is the caller's weight. (The authors' code instead uses the mean of squared differences,
    i.e. the squared distance divided by h*w.) Invariant to scaling either map and to the channel count; the spatial
    sizes must match.
    """
    if student_fmap.shape[0] != teacher_fmap.shape[0] or student_fmap.shape[2:] != teacher_fmap.shape[2:]:
        raise DistilError(f"attention_transfer: student map {list(student_fmap.shape)} and teacher map "
                          f"{list(teacher_fmap.shape)} need the same batch and spatial sizes (channels may differ); "
                          "pick layers at the same resolution")
    diff = attention_map(student_fmap, p=p) - attention_map(teacher_fmap, p=p)
    return torch.linalg.vector_norm(diff, ord=2, dim=1).mean()
