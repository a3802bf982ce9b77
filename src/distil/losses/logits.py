"""Divergences between output distributions, in the style of torch.nn.functional.

Every function takes ``(student_logits, teacher_logits, ...)`` with the classes / vocabulary on the last dimension and
any leading dimensions (``[batch, classes]`` or ``[batch, seq, vocab]``). Conventions shared by all of them:

- The divergences compare the temperature-softened distributions ``softmax(logits / T)`` and return the plain
  divergence, WITHOUT the ``T**2`` factor. ``T**2`` (which keeps gradient magnitudes comparable across temperatures) is
  applied where loss terms are combined: in :func:`distillation_loss`, :func:`dkd` and in recipe loss terms.
- ``mask`` (bool, the leading shape) keeps positions; ``reduction="mean"`` averages over kept positions, ``"sum"``
  sums them, ``"none"`` returns per-position values with 0 at dropped positions. Dropped positions are removed before
  any arithmetic, so whatever they hold (even NaN) has no effect on the value or the gradients.
- The teacher is a constant: its logits are detached inside, so gradients reach the student only.
- Arithmetic is in log space and in float32 for bf16/fp16/fp32 inputs (float64 stays float64); results are float32
  (or float64).
- ``-inf`` logits (a masked vocabulary entry) give finite values and gradients: a log-probability of ``-inf`` is
  replaced by :data:`LOG_PROB_FLOOR` (log of the smallest normal float32, about -87.3), i.e. an excluded entry is
  treated as having probability ~1e-38. Where both models exclude an entry it contributes exactly 0; where only one
  does, a divergence that would be infinite instead costs at most ~87 nats per unit of probability mass.
- An all-masked input gives 0 with a zero gradient, never NaN.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from distil.errors import DistilError

__all__ = [
    "LOG_PROB_FLOOR",
    "distillation_loss",
    "dkd",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
]

LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------- helpers
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DistilError(f"{name} must lie in [0, 1], got {value}; pick a value between 0 and 1")


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise DistilError(f"temperature must be a finite number > 0, got {temperature}; 1.0 means no softening")


def _flatten_pair(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return the kept rows ``[K, V]`` of both (teacher detached), in the compute dtype."""
    if student_logits.shape != teacher_logits.shape:
        raise DistilError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape; both need the same leading dimensions and vocabulary (slice the larger vocabulary to the shared "
            "one)"
        )
    if student_logits.dim() == 0:
        raise DistilError("logits need at least one dimension (the classes / vocabulary, last)")
    dtype = _compute_dtype(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    teacher_logits = teacher_logits.detach()
    if mask is None:
        s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    else:
        lead = student_logits.shape[:-1]
        if mask.dtype != torch.bool or mask.shape != lead:
            raise DistilError(
                f"mask must be a bool tensor of shape {tuple(lead)} (the logits without the last dimension), got "
                f"{mask.dtype} {tuple(mask.shape)}; build it as labels != -100"
            )
        s, t = student_logits[mask], teacher_logits[mask]
    return s.to(dtype), t.to(dtype)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    lp = F.log_softmax(logits / temperature, dim=-1)
    # -inf log-probabilities (excluded entries) become a finite floor so that 0 * (-inf) never produces NaN.
    return torch.where(lp == -math.inf, LOG_PROB_FLOOR, lp)


def _kl_rows(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (lp_p.exp() * (lp_p - lp_q)).sum(-1)


def _mix(lp_a: torch.Tensor, lp_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b); exact at weight 0 and 1."""
    if weight == 0.0:
        return lp_b
    if weight == 1.0:
        return lp_a
    return torch.logaddexp(lp_a + math.log(weight), lp_b + math.log1p(-weight))


def _reduce(
    values: torch.Tensor, lead_shape: torch.Size, mask: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    if reduction == "mean":
        # An empty sum is 0 and keeps the graph, so an all-masked batch gives 0 with a zero gradient.
        return values.sum() / max(values.numel(), 1)
    if reduction == "sum":
        return values.sum()
    if mask is None:
        return values.reshape(lead_shape)
    return values.new_zeros(lead_shape).masked_scatter(mask, values)


def _divergence(
    rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    _check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise DistilError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    s, t = _flatten_pair(student_logits, teacher_logits, mask)
    lp_s = _log_probs(s, temperature)
    values = rows(lp_s, _log_probs(t, temperature))
    if lp_s.requires_grad and not values.requires_grad:  # a constant 0 (skew alpha = 1): keep the graph, zero grad
        values = values + 0.0 * lp_s[:, 0]
    return _reduce(values, student_logits.shape[:-1], mask, reduction)


# ------------------------------------------------------------------------------------------------ divergences
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_teacher || p_student) of the temperature-softened distributions (mass-covering). No T**2 factor."""
    return _divergence(lambda s, t: _kl_rows(t, s), student_logits, teacher_logits, temperature, mask, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_student || p_teacher) of the temperature-softened distributions (mode-seeking). No T**2 factor."""
    return _divergence(_kl_rows, student_logits, teacher_logits, temperature, mask, reduction)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence in the convention of TRL's GKD (Agarwal et al., 2024).

    ``m = beta * p_teacher + (1 - beta) * p_student`` and
    ``JSD = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``. As in TRL, ``beta = 0`` is exactly
    :func:`forward_kl` and ``beta = 1`` exactly :func:`reverse_kl`; note that the interior formula itself tends to 0 at
    both ends (it behaves like ``beta * forward KL`` near 0), so the value jumps at the two endpoints. No T**2 factor.
    """
    _check_unit("beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)

    def rows(lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
        lp_m = _mix(lp_t, lp_s, beta)
        return beta * _kl_rows(lp_t, lp_m) + (1.0 - beta) * _kl_rows(lp_s, lp_m)

    return _divergence(rows, student_logits, teacher_logits, temperature, mask, reduction)


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): KL(p_teacher || alpha * p_teacher + (1 - alpha) * p_student).

    ``alpha = 0`` is exactly :func:`forward_kl`; ``alpha = 1`` is 0. No T**2 factor.
    """
    _check_unit("alpha", alpha)
    return _divergence(
        lambda s, t: _kl_rows(t, _mix(t, s, alpha)), student_logits, teacher_logits, temperature, mask, reduction
    )


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(p_student || alpha * p_student + (1 - alpha) * p_teacher).

    ``alpha = 0`` is exactly :func:`reverse_kl`; ``alpha = 1`` is 0. No T**2 factor.
    """
    _check_unit("alpha", alpha)
    return _divergence(
        lambda s, t: _kl_rows(s, _mix(s, t, alpha)), student_logits, teacher_logits, temperature, mask, reduction
    )


def tvd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p_teacher - p_student| of the softened distributions (in [0, 1])."""
    return _divergence(
        lambda s, t: 0.5 * (t.exp() - s.exp()).abs().sum(-1), student_logits, teacher_logits, temperature, mask,
        reduction,
    )


# ------------------------------------------------------------------------------------- label-aware losses
def _flatten_labels(
    student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(valid mask of the leading shape, the valid labels)``; check labels against the class count."""
    lead = student_logits.shape[:-1]
    if labels.shape != lead:
        raise DistilError(
            f"labels of shape {tuple(labels.shape)} do not match the logits {tuple(student_logits.shape)}; labels "
            "need the logits' shape without the last dimension"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DistilError(f"labels must be integer class indices, got {labels.dtype}")
    valid = labels != ignore_index
    kept = labels[valid]
    classes = student_logits.shape[-1]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= classes):
        raise DistilError(
            f"labels must lie in [0, {classes}) or equal ignore_index={ignore_index}; found "
            f"{int(kept.min())}..{int(kept.max())}"
        )
    return valid, kept


def _cross_entropy(student_logits: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean next-label CE over valid positions, in fp32 (fp64 stays), 0 with zero gradient when none is valid."""
    dtype = _compute_dtype(student_logits)
    lp = F.log_softmax(student_logits[valid].to(dtype), dim=-1)
    nll = -lp.gather(-1, kept.unsqueeze(-1)).squeeze(-1)
    return nll.sum() / max(nll.numel(), 1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The classic KD loss (Hinton et al., 2015):

    ``alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)``.

    ``alpha`` weights the teacher's soft term and ``1 - alpha`` the hard-label cross-entropy (libraries disagree on
    this; here alpha = 1 is pure distillation, alpha = 0 plain supervised training). The KL is "batchmean": the mean
    over positions whose label is not ``ignore_index`` (all positions for plain classification), like the CE. The CE
    uses the unsoftened logits. Returns 0 with a zero gradient when every label is ``ignore_index``.
    """
    _check_unit("alpha", alpha)
    _check_temperature(temperature)
    valid, kept = _flatten_labels(student_logits, labels, ignore_index)
    soft = forward_kl(student_logits, teacher_logits, temperature=temperature, mask=valid)
    hard = _cross_entropy(student_logits, valid, kept)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022): ``T**2 * (alpha * TCKD + beta * NCKD)``.

    TCKD is the KL(teacher || student) between the binary distributions [p(target), 1 - p(target)]; NCKD the
    KL(teacher || student) between the distributions over the non-target classes, renormalised. Both use the softened
    distributions; the T**2 factor is included (as in the paper's code). Averaged over positions whose label is not
    ``ignore_index``; 0 with a zero gradient when there are none. The teacher is detached.
    """
    _check_temperature(temperature)
    if alpha < 0 or beta < 0:
        raise DistilError(f"dkd weights must be >= 0, got alpha={alpha}, beta={beta}")
    if student_logits.shape != teacher_logits.shape:
        raise DistilError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape"
        )
    if student_logits.shape[-1] < 2:
        raise DistilError("dkd needs at least 2 classes (it splits the target class from the others)")
    valid, kept = _flatten_labels(student_logits, labels, ignore_index)
    s, t = _flatten_pair(student_logits, teacher_logits, valid)
    target = F.one_hot(kept, s.shape[-1]).bool()

    def parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp = _log_probs(logits, temperature)
        lp_target = lp.gather(-1, kept.unsqueeze(-1))
        lp_other = lp.masked_fill(target, -math.inf).logsumexp(-1, keepdim=True)
        binary = torch.cat([lp_target, lp_other], dim=-1)  # finite: lp is floored
        # Non-target distribution: the target removed before normalising (mdistiller subtracts 1000 instead).
        non_target = _log_probs(logits.masked_fill(target, -math.inf), temperature)
        return binary, non_target

    bin_s, rest_s = parts(s)
    bin_t, rest_t = parts(t)
    values = alpha * _kl_rows(bin_t, bin_s) + beta * _kl_rows(rest_t, rest_s)
    return temperature**2 * values.sum() / max(values.numel(), 1)
