"""Divergences between next-token distributions over different vocabularies, at aligned positions
(distil.data.alignment): the student's logits [N, Vs] against the teacher's [N, Vt].

- `uld`: the Universal Logit Distillation loss (Boizard et al. 2024), the Wasserstein-1 distance between the two
  distributions with tokens ranked by probability, i.e. the L1 distance between the sorted probability vectors (the
  shorter one padded with zeros). It ignores which token is which, so it works for any pair of vocabularies.
- `mapped_kl`, in the spirit of GOLD: teacher tokens mapped to student tokens (`VocabMap`: equal strings, and with
  distil.data.alignment.projected_vocab_map every other teacher token to the student token it starts with) are
  compared by a forward KL over {student tokens, everything else}; where the student's next token is spelled by
  several teacher tokens, the teacher's probability of it is the product along that spelling, taken out of the
  first teacher token's mass. What is left unmapped on each side is compared by ULD on the residual masses. With one
  tokenizer on both sides every token is mapped and it equals forward KL.

Conventions of distil.losses: (student, teacher) order, temperature-softened, per-position values averaged over
the positions `mask` keeps (0 with zero gradient when none is kept), fp32 arithmetic, finite with -inf logits. The
`*_per_position` forms return [N] values for chunked callers (`chunked_cross_vocab`, which never holds either model's
[tokens, vocab] logits for more than one chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.losses.fused import _apply


@dataclass(frozen=True)
class VocabMap:
    """Token pairs: teacher token teacher_ids[j] counts as student token student_ids[j]. Each teacher token appears
    at most once; a student token may stand for several teacher tokens (their probabilities add up)."""

    teacher_ids: torch.Tensor  # [K] int64
    student_ids: torch.Tensor  # [K] int64

    def to(self, device: torch.device) -> VocabMap:
        return VocabMap(self.teacher_ids.to(device), self.student_ids.to(device))


@dataclass(frozen=True)
class Merges:
    """Per position, a student next token that several teacher tokens spell (-1: none), the first of those teacher
    tokens, and the teacher's log-probability of the whole spelling (temperature-softened, as the loss)."""

    student_token: torch.Tensor  # [N] int64
    teacher_first: torch.Tensor  # [N] int64
    logprob: torch.Tensor  # [N] float

    def rows(self, index: slice | torch.Tensor) -> Merges:
        return Merges(self.student_token[index], self.teacher_first[index], self.logprob[index])


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: half-precision logits are upcast, float64 (gradient checks) kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sorted_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor, top_k: int | None = None
                    ) -> torch.Tensor:
    """[N] L1 distance between the rows sorted in decreasing order, the shorter padded with zeros.

    With `top_k`, only each row's `top_k` largest entries are ranked (a top-k instead of a sort of 152k entries per
    row: about 15x faster); the tails beyond them count by their total masses A and B as |A - B|. The result is
    never above the exact distance and at most 2 * min(A, B) below it (exact, up to rounding, once `top_k` reaches
    the smaller vocabulary: that row's tail is empty)."""
    if top_k is not None:
        k = min(top_k, student_probs.shape[-1], teacher_probs.shape[-1])
        s, t = student_probs.topk(k, dim=-1).values, teacher_probs.topk(k, dim=-1).values
        tails = (student_probs.sum(-1) - s.sum(-1)) - (teacher_probs.sum(-1) - t.sum(-1))
        return (s - t).abs().sum(-1) + tails.abs()
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    width = min(s.shape[-1], t.shape[-1])
    # Past the shorter row, the padded zeros leave the longer row's tail: it counts as it is.
    return (s[:, :width] - t[:, :width]).abs().sum(-1) + s[:, width:].sum(-1) + t[:, width:].sum(-1)


def uld_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    p_s = F.softmax(_fp32(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_fp32(teacher_logits) / temperature, dim=-1)
    return sorted_distance(p_s, p_t, top_k)


def mapped_kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab: VocabMap, *,
                           merges: Merges | None = None, temperature: float = 1.0, kl_weight: float = 1.0,
                           uld_weight: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    n, v_s = student_logits.shape
    log_s = F.log_softmax(_fp32(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_fp32(teacher_logits) / temperature, dim=-1).to(log_s.dtype)
    rows = torch.arange(n, device=p_t.device)
    mapped_t = torch.zeros(p_t.shape[-1], dtype=torch.bool, device=p_t.device)
    mapped_t[vocab.teacher_ids] = True
    mapped_s = torch.zeros(n, v_s, dtype=torch.bool, device=p_t.device)
    mapped_s[:, vocab.student_ids] = True
    q = torch.zeros(n, v_s, dtype=p_t.dtype, device=p_t.device)  # the teacher's mass on the student's tokens
    q.index_add_(1, vocab.student_ids, p_t[:, vocab.teacher_ids])
    residual_t = p_t.masked_fill(mapped_t, 0.0)
    if merges is not None:
        q, residual_t, mapped_s = _apply_merges(q, residual_t, mapped_s, mapped_t, vocab, merges, rows)
    # Forward KL over the mapped tokens plus one outcome for everything else (its mass on each side). Where every
    # student token is mapped, the teacher's mass on tokens the student cannot spell has nowhere to go: dropped.
    other_t = residual_t.sum(-1).clamp_min(0.0)
    everything_mapped = mapped_s.all(-1, keepdim=True)
    rest_s = torch.where(everything_mapped, torch.zeros_like(log_s), log_s.masked_fill(mapped_s, float("-inf")))
    log_other_s = torch.logsumexp(rest_s, dim=-1)
    cross = torch.where(q > 0, q * log_s, torch.zeros_like(q))  # 0 log 0 = 0, also where the student has -inf
    kl = (torch.xlogy(q, q) - cross).sum(-1)
    counted = (other_t > 0) & ~everything_mapped.squeeze(-1)
    kl = kl + torch.where(counted, torch.xlogy(other_t, other_t) - other_t * log_other_s, torch.zeros_like(other_t))
    if uld_weight == 0:
        return kl_weight * kl
    residual_s = log_s.exp().masked_fill(mapped_s, 0.0)
    return kl_weight * kl + uld_weight * sorted_distance(residual_s, residual_t, top_k)


def _apply_merges(q: torch.Tensor, residual_t: torch.Tensor, mapped_s: torch.Tensor, mapped_t: torch.Tensor,
                  vocab: VocabMap, merges: Merges, rows: torch.Tensor):
    """Move the mass of each multi-token spelling from its first teacher token to the student token it spells."""
    has = merges.student_token >= 0
    if not bool(has.any()):
        return q, residual_t, mapped_s
    r, s_tok, t_first = rows[has], merges.student_token[has], merges.teacher_first[has]
    mass = merges.logprob[has].to(q.dtype).exp()
    student_of = torch.full((mapped_t.numel(),), -1, dtype=torch.long, device=q.device)
    student_of[vocab.teacher_ids] = vocab.student_ids
    first_s = student_of[t_first]
    q, residual_t, mapped_s = q.clone(), residual_t.clone(), mapped_s.clone()
    on_mapped = first_s >= 0  # the first teacher token's mass sits on a student token, or in the residual
    q[r[on_mapped], first_s[on_mapped]] -= mass[on_mapped]
    residual_t[r[~on_mapped], t_first[~on_mapped]] -= mass[~on_mapped]
    q[r, s_tok] += mass
    mapped_s[r, s_tok] = True
    return q.clamp_min(0.0), residual_t.clamp_min(0.0), mapped_s


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    keep = mask.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1.0)


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
        mask: torch.Tensor | None = None, top_k: int | None = None) -> torch.Tensor:
    """ULD between [N, Vs] student and [N, Vt] teacher logits at aligned positions, averaged over `mask`; `top_k`
    ranks only each row's largest entries (`sorted_distance`)."""
    return masked_mean(uld_per_position(student_logits, teacher_logits, temperature=temperature, top_k=top_k), mask)


def mapped_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab: VocabMap, *,
              merges: Merges | None = None, temperature: float = 1.0, kl_weight: float = 1.0,
              uld_weight: float = 1.0, mask: torch.Tensor | None = None, top_k: int | None = None) -> torch.Tensor:
    """kl_weight x KL over equal-string tokens (+ the rest as one outcome) + uld_weight x ULD of the rest (its
    sorted vectors cut to `top_k` entries when given)."""
    return masked_mean(mapped_kl_per_position(student_logits, teacher_logits, vocab, merges=merges,
                                              temperature=temperature, kl_weight=kl_weight, uld_weight=uld_weight,
                                              top_k=top_k), mask)


def chunked_cross_vocab(per_position: Callable[..., torch.Tensor], student_hidden: torch.Tensor,
                        student_weight: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                        mask: torch.Tensor | None = None, merges: Merges | None = None, chunk_size: int = 512,
                        **options: Any) -> torch.Tensor:
    """`per_position` over the aligned hidden states [N, H] and LM-head weights [V, H] of both models, averaged over
    `mask`, one chunk of positions at a time: each chunk's logits of both models are formed once, its loss and the
    gradient with respect to the student's logits are taken there, and that gradient is folded into the student's
    hidden-state and weight gradients at once (distil.losses.fused), so memory holds one chunk's [chunk, V] and
    nothing is recomputed in the backward pass. Double backward is not supported."""
    n = student_hidden.shape[0]
    keep = torch.ones(n, device=student_hidden.device) if mask is None else mask.to(torch.float32)
    keep = keep.to(torch.float64) if student_hidden.dtype == torch.float64 else keep
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    if chunk_size < 1:
        raise DistilError(f"chunk_size must be a positive number of positions, got {chunk_size}")

    def step(h: torch.Tensor, start: int, end: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Grad mode is off here (inside the fused function's forward or under no_grad).
        t_logits = teacher_hidden[start:end] @ teacher_weight.T
        extra = {"merges": merges.rows(slice(start, end))} if merges is not None else {}
        z = _fp32(h @ student_weight.T)  # a bf16 student's chunk: fp32 loss and gradient, as the fused kernels
        if not want_grad:
            return (per_position(z, t_logits, **extra, **options) * keep[start:end]).sum(), None
        with torch.enable_grad():
            z.requires_grad_(True)
            value = (per_position(z, t_logits, **extra, **options) * keep[start:end]).sum()
            (grad,) = torch.autograd.grad(value, z)
        return value.detach(), grad

    return _apply(student_hidden, student_weight, chunk_size, step, "sum") / keep.sum().clamp_min(1.0)
