"""Several teachers: one target distribution from their mixture, or one loss term per teacher.

The mixture is the weighted average of the teachers' temperature-softened probabilities, computed in log space:
    log p(y) = logsumexp_i( log w_i + log_softmax(z_i / T) ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distil.errors import DistilError


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise DistilError(f"got {len(w)} teacher weights for {n} teachers; give one weight per teacher")
    if any(not x >= 0 or x == float("inf") for x in w) or sum(w) <= 0:
        raise DistilError(f"teacher weights must be finite, non-negative and not all zero, got {w}")
    total = sum(w)
    return [x / total for x in w]


def combine_teacher_logprobs(
    teacher_logits_list: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities (float32, or float64 for float64 inputs) of the weighted mixture of the teachers'
    distributions softened by `temperature`. Weights are normalised to sum to 1 (None: equal weights).

    All teachers must share the vocabulary (same shape). A teacher with weight 0 does not contribute."""
    if not teacher_logits_list:
        raise DistilError("combine_teacher_logprobs needs at least one teacher's logits")
    if not temperature > 0:
        raise DistilError(f"temperature must be positive, got {temperature}")
    shape = teacher_logits_list[0].shape
    for i, z in enumerate(teacher_logits_list):
        if z.shape != shape:
            raise DistilError(f"teacher {i} logits have shape {list(z.shape)}, teacher 0 has {list(shape)}; "
                              "multi-teacher mixtures need the same positions and the same vocabulary")
    w = _weights(weights, len(teacher_logits_list))
    dtype = torch.float64 if teacher_logits_list[0].dtype == torch.float64 else torch.float32
    terms = [
        (z.to(dtype) / temperature).log_softmax(dim=-1) + torch.log(torch.tensor(wi, dtype=dtype, device=z.device))
        for z, wi in zip(teacher_logits_list, w)
        if wi > 0
    ]
    return torch.logsumexp(torch.stack(terms, dim=0), dim=0)


def combine_teacher_logits(
    teacher_logits_list: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The mixture as logits for a loss that softens its teacher by the same `temperature`:
    softmax(result / T) is exactly the mixture, so this drops in wherever one teacher's logits go."""
    return temperature * combine_teacher_logprobs(teacher_logits_list, weights, temperature=temperature)


def per_teacher_loss(
    loss_fn: Callable[..., torch.Tensor],
    student: torch.Tensor,
    teachers: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """sum_i w_i * loss_fn(student, teacher_i, **kwargs): one loss term per teacher, weights normalised to sum 1."""
    if not teachers:
        raise DistilError("per_teacher_loss needs at least one teacher")
    w = _weights(weights, len(teachers))
    return sum(wi * loss_fn(student, t, **kwargs) for wi, t in zip(w, teachers) if wi > 0)
