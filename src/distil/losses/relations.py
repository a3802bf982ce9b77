"""Relational knowledge distillation (RKD, Park et al. 2019): distance-wise and angle-wise losses.

The student matches the structure of the batch -- pairwise distances, and angles of triplets -- rather than the
embeddings themselves, so the two embedding widths may differ and no projector is needed. Reductions follow the
authors' reference implementation (lenscloth/RKD), whose loss weights (25 for distance, 50 for angle) assume them:
the smooth-L1 (Huber, delta=1) terms are averaged over all N^2 ordered pairs (distance, with the diagonal at 0) and
all N^3 ordered triplets (angle, where degenerate triplets contribute 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.errors import DistilError


def _flat(emb: torch.Tensor, what: str) -> torch.Tensor:
    if emb.dim() < 2:
        raise DistilError(f"RKD needs {what} embeddings [N, ...], got shape {list(emb.shape)}")
    return (emb if emb.dtype == torch.float64 else emb.float()).flatten(1)


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise DistilError(f"RKD: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    if student.shape[0] < 2:
        raise DistilError("RKD needs at least 2 samples in a batch: relations are between samples")


def pairwise_distances(emb: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances [N, N] with an exact zero diagonal (the reference's pdist, squared terms clamped at eps)."""
    sq = emb.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * emb @ emb.t()).clamp_min(eps)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _normalised_distances(emb: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(emb)
    positive = d > 0
    mean = torch.where(positive, d, torch.zeros_like(d)).sum() / positive.sum().clamp_min(1)
    return d / mean.clamp_min(1e-12)


def rkd_distance(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss: smooth-L1 between pairwise distances, each normalised by its mean (non-zero) distance.

    student_emb [N, Ds], teacher_emb [N, Dt] (extra dims are flattened). Unchanged by scaling either embedding, by
    rotating or translating it, and by its width (any isometric embedding into more dimensions)."""
    _check(student_emb, teacher_emb)
    s = _normalised_distances(_flat(student_emb, "student"))
    t = _normalised_distances(_flat(teacher_emb, "teacher"))
    return F.smooth_l1_loss(s, t, reduction="mean")


def _angles(emb: torch.Tensor) -> torch.Tensor:
    # diff[i, j] = e_j - e_i; cos of the angle at vertex i between j and k, for all (i, j, k).
    diff = F.normalize(emb[None, :, :] - emb[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss: smooth-L1 between the cosines of the angles formed by every triplet of the batch.

    Memory is O(N^2 * D) for the difference vectors and O(N^3) for the angles; keep N modest (the paper uses 64+)."""
    _check(student_emb, teacher_emb)
    s = _angles(_flat(student_emb, "student"))
    t = _angles(_flat(teacher_emb, "teacher"))
    return F.smooth_l1_loss(s, t, reduction="mean")
