"""Divergences against sparse teacher targets (a teacher cache), in the style of torch.nn.functional.

Arguments are ``(student_logits, <teacher targets>...)``; the teacher targets are constants. Conventions are those
of the dense divergences: the student's distribution is ``softmax(student_logits / T)`` over the WHOLE vocabulary
(never renormalised over the stored ids), values carry no ``T**2`` factor, ``mask`` (bool, the leading shape) keeps
positions, ``reduction="mean"`` averages over kept positions, an all-masked batch gives 0 with a zero gradient, and
arithmetic is in float32 (float64 stays float64). ``-inf`` log-probabilities are floored at ``LOG_PROB_FLOOR``.

Top-k targets (``target_ids``, ``target_logprobs`` and ``tail_logmass``) define a coarser distribution over k + 1
buckets: each stored token, and one "tail" bucket for every other token. The student is coarsened the same way
(its tail bucket is the exact mass it puts outside the stored ids). The divergences below are the divergences
between the two coarsened distributions:

- exact when the targets cover the vocabulary (k = V): ``sparse_forward_kl`` equals the dense forward KL;
- otherwise a lower bound of the dense divergence (data-processing inequality), which only ignores how each model
  spreads its tail mass over the tail tokens. This holds for forward KL, reverse KL and the generalized JSD alike.

Without ``tail_logmass``, ``sparse_forward_kl`` sums over the stored tokens only (the teacher's tail is dropped, as in
peers' top-k losses); reverse KL and JSD need the tail and refuse to run without it.

Sampled targets (``sample_ids`` and ``sample_weights`` = count / draws, drawn from the teacher's distribution) give
``sampled_forward_kl``, an unbiased estimate of the cross-entropy, and of the forward KL when the teacher's entropy is
given (Anshumann et al., ACL 2025). Reverse KL and JSD have no unbiased estimate from teacher samples.

Temperature: a cache stores the teacher's log-probabilities at its build temperature; ``temperature`` here softens
the student only, so it must equal the cache's (``TeacherCache.check_compatible(temperature=...)`` refuses otherwise,
because the teacher's tail cannot be re-softened exactly from top-k targets).
"""

from __future__ import annotations

import math
import torch

from distil.errors import DistilError

__all__ = [
    "sampled_forward_kl",
    "sparse_forward_kl",
    "sparse_jsd",
    "sparse_reverse_kl",
]

# The same floor as distil.losses.logits.LOG_PROB_FLOOR (defined here too so that this module stands alone).
LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # about -87.3
_EXACT_TAIL_BELOW = 1e-3  # student tail masses below this are summed exactly rather than taken as 1 - sum
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------- helpers
def _check(temperature: float, reduction: str) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise DistilError(f"temperature must be a finite number > 0, got {temperature}; 1.0 means no softening")
    if reduction not in _REDUCTIONS:
        raise DistilError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def _rows(
    student_logits: torch.Tensor, mask: torch.Tensor | None, **targets: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Check shapes; return the kept rows of the student (compute dtype) and of each target (detached)."""
    if student_logits.dim() == 0:
        raise DistilError("student logits need at least one dimension (the vocabulary, last)")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    for name, t in targets.items():
        if t is None:
            continue
        want = lead if name in ("tail_logmass", "teacher_entropy") else None
        if (want is not None and t.shape != want) or (want is None and t.shape[:-1] != lead):
            raise DistilError(f"{name} has shape {tuple(t.shape)}; with student logits {tuple(student_logits.shape)} "
                              f"it needs {tuple(lead)}{'' if want is not None else ' + [k]'}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != lead):
        raise DistilError(f"mask must be a bool tensor of shape {tuple(lead)}, got {mask.dtype} {tuple(mask.shape)}; "
                          "build it as labels != -100")

    def rows(t: torch.Tensor, width: bool) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1]) if width else t.reshape(-1)
        return flat if mask is None else flat[mask.reshape(-1)]

    s = rows(student_logits, True).to(dtype)
    out = {}
    for name, t in targets.items():
        if t is None:
            out[name] = None
            continue
        t = rows(t.detach(), name not in ("tail_logmass", "teacher_entropy"))
        out[name] = t.long() if name in ("target_ids", "sample_ids") else t.to(dtype)
        # Checked on the CPU only: on an accelerator the check would synchronise every step.
        if name in ("target_ids", "sample_ids") and t.device.type == "cpu" and t.numel() and (
            int(t.min()) < 0 or int(t.max()) >= vocab
        ):
            raise DistilError(f"{name} hold token ids outside the student's vocabulary of {vocab}")
    return s, out


def _reduce(values: torch.Tensor, lead: torch.Size, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.sum() / max(values.numel(), 1)
    if reduction == "sum":
        return values.sum()
    if mask is None:
        return values.reshape(lead)
    return values.new_zeros(lead).masked_scatter(mask, values)


def _soften(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return z if temperature == 1.0 else z / temperature  # no copy of [N, V] logits when there is nothing to do


def _floor(lp: torch.Tensor) -> torch.Tensor:
    return lp.clamp_min(LOG_PROB_FLOOR)


def _buckets(
    z: torch.Tensor, ids: torch.Tensor | None, lp: torch.Tensor, tail: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities over the buckets (stored tokens, then the tail), and which count.

    Padding entries (log-prob ``-inf``) are not buckets. ``z`` are the student's softened logits ``[N, V]``.
    """
    valid = lp > -math.inf
    # log_softmax then gather costs about what cross-entropy costs (logsumexp's backward is twice as slow on CPU).
    lsm = torch.log_softmax(z, dim=-1)
    if ids is None:  # full distributions: every token is its own bucket, no tail
        return lp, lsm, valid
    if tail is None:  # no tail bucket: the student still normalised over the whole vocabulary
        return lp, lsm.gather(-1, ids), valid
    # Padding entries repeat the row's first id, so that they add nothing to the stored set.
    ids = torch.where(valid, ids, ids[:, :1])
    in_set = valid.clone()
    in_set[:, :1] = True
    lq_set = lsm.gather(-1, ids)
    return torch.cat([lp, tail.unsqueeze(-1)], -1), torch.cat([lq_set, _student_tail(lsm, ids, lq_set, in_set)], -1), \
        torch.cat([valid, torch.ones_like(valid[:, :1])], -1)


def _student_tail(lsm: torch.Tensor, ids: torch.Tensor, lq_set: torch.Tensor, in_set: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the stored ids, ``[N, 1]``.

    ``log(1 - sum of the stored probabilities)`` is cheap, and accurate to about 1e-6 in absolute terms in float32:
    enough where the tail holds at least ``_EXACT_TAIL_BELOW`` of the mass. Rows with less are recomputed exactly
    as the sum over the tail tokens themselves (a pass over the vocabulary, on those rows only).
    """
    log_in = torch.where(in_set, lq_set, -math.inf).logsumexp(-1)
    exact = log_in > (math.log1p(-_EXACT_TAIL_BELOW) if _EXACT_TAIL_BELOW < 1 else -math.inf)
    # where() before log(-expm1) so that the exact rows never see log(0), whose gradient would be NaN.
    tail = torch.log(-torch.expm1(torch.where(exact, -1.0, log_in)))
    if bool(exact.any()):
        rows = exact.nonzero().squeeze(1)
        # Probabilities are <= 1, so summing exp directly is safe; it is about twice as fast as a logsumexp here.
        tiny = torch.finfo(lsm.dtype).tiny
        outside = lsm[rows].exp().scatter(-1, ids[rows], 0.0).sum(-1).clamp_min(tiny).log()
        tail = tail.index_put((rows,), outside)
    return tail.unsqueeze(-1)


def _kl(lp_a: torch.Tensor, lp_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row over the valid buckets."""
    a, b = _floor(lp_a), _floor(lp_b)
    return torch.where(valid, a.exp() * (a - b), 0.0).sum(-1)


def _divergence(kind: str, student_logits: torch.Tensor, target_ids: torch.Tensor | None,
                target_logprobs: torch.Tensor, tail_logmass: torch.Tensor | None, temperature: float,
                mask: torch.Tensor | None, reduction: str, beta: float = 0.5) -> torch.Tensor:
    _check(temperature, reduction)
    if target_ids is not None and target_ids.shape != target_logprobs.shape:
        raise DistilError(f"target_ids {tuple(target_ids.shape)} and target_logprobs {tuple(target_logprobs.shape)} "
                          "differ in shape")
    if target_ids is None and target_logprobs.shape != student_logits.shape:
        raise DistilError(f"full target_logprobs {tuple(target_logprobs.shape)} need the student's shape "
                          f"{tuple(student_logits.shape)}")
    if kind != "forward" and target_ids is not None and tail_logmass is None:
        raise DistilError(f"the sparse {kind} divergence needs tail_logmass (the teacher's mass outside the stored "
                          "ids); build the cache in topk mode, which stores it, or use sparse_forward_kl")
    z, t = _rows(student_logits, mask, target_ids=target_ids, target_logprobs=target_logprobs,
                 tail_logmass=tail_logmass)
    teacher, student, valid = _buckets(_soften(z, temperature), t["target_ids"], t["target_logprobs"],
                                       t["tail_logmass"])
    return _reduce(bucket_divergence(kind, teacher, student, valid, beta), student_logits.shape[:-1], mask, reduction)


def bucket_divergence(kind: str, teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor,
                      beta: float = 0.5) -> torch.Tensor:
    """Per row, the ``kind`` ("forward", "reverse" or "jsd") divergence between bucketed log-probabilities
    ``[N, B]`` over the ``valid`` buckets (shared with :mod:`distil.losses.fused_sparse`)."""
    if kind == "forward":
        return _kl(teacher, student, valid)
    if kind == "reverse":
        return _kl(student, teacher, valid)
    a, b = _floor(teacher), _floor(student)
    m = torch.logaddexp(a + math.log(beta), b + math.log1p(-beta))
    return beta * _kl(a, m, valid) + (1.0 - beta) * _kl(b, m, valid)


def divergence_kind(sparse: object, beta: float = 0.5) -> str:
    """The :func:`bucket_divergence` kind of a sparse divergence function (``sparse_jsd`` at beta 0 or 1 is KL)."""
    if sparse is sparse_jsd:
        return "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "jsd"
    return {sparse_forward_kl: "forward", sparse_reverse_kl: "reverse"}[sparse]


# ------------------------------------------------------------------------------------------------ divergences
def sparse_forward_kl(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    *,
    tail_logmass: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher || student) over the stored tokens plus the tail bucket (see the module doc). No T**2 factor.

    ``target_ids`` int ``[..., k]`` with ``target_logprobs`` ``[..., k]`` (``-inf`` marks padding), ``tail_logmass``
    ``[...]``; ``target_ids=None`` means ``target_logprobs`` is the teacher's full distribution ``[..., V]``.
    """
    return _divergence("forward", student_logits, target_ids, target_logprobs, tail_logmass, temperature, mask,
                       reduction)


def sparse_reverse_kl(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    *,
    tail_logmass: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(student || teacher) between the bucketed distributions (exact when k = V). Needs ``tail_logmass``."""
    return _divergence("reverse", student_logits, target_ids, target_logprobs, tail_logmass, temperature, mask,
                       reduction)


def sparse_jsd(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    *,
    tail_logmass: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized JSD (TRL's GKD convention: beta = 0 forward KL, 1 reverse KL) between the bucketed distributions."""
    if not 0.0 <= beta <= 1.0:
        raise DistilError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return sparse_forward_kl(student_logits, target_ids, target_logprobs, tail_logmass=tail_logmass,
                                 temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1.0:
        return sparse_reverse_kl(student_logits, target_ids, target_logprobs, tail_logmass=tail_logmass,
                                 temperature=temperature, mask=mask, reduction=reduction)
    return _divergence("jsd", student_logits, target_ids, target_logprobs, tail_logmass, temperature, mask,
                       reduction, beta)


def sampled_forward_kl(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_weights: torch.Tensor,
    *,
    teacher_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Unbiased estimate of the cross-entropy ``-sum_v p(v) log q(v)`` from tokens drawn from the teacher.

    ``sample_weights`` are count / number of draws (0 in padding), so ``E[weights] = p``. With ``teacher_entropy``
    the estimate is of KL(teacher || student) = cross-entropy - entropy. Its gradient, ``softmax - weights``, is an
    unbiased estimate of the dense gradient too. No T**2 factor.
    """
    _check(temperature, reduction)
    if sample_ids.shape != sample_weights.shape:
        raise DistilError(f"sample_ids {tuple(sample_ids.shape)} and sample_weights {tuple(sample_weights.shape)} "
                          "differ in shape")
    z, t = _rows(student_logits, mask, sample_ids=sample_ids, sample_weights=sample_weights,
                 teacher_entropy=teacher_entropy)
    lq = _floor(torch.log_softmax(_soften(z, temperature), dim=-1).gather(-1, t["sample_ids"]))
    values = -(t["sample_weights"] * lq).sum(-1)
    if t["teacher_entropy"] is not None:
        values = values - t["teacher_entropy"]
    return _reduce(values, student_logits.shape[:-1], mask, reduction)
