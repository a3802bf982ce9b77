"""Token-level KD and cross-entropy in ONE chunked pass over the LM heads.

Computing ``kd_weight * divergence + ce_weight * CE`` as two fused losses recomputes the student's logits (and their
gradient matmuls) once per term: at a 49k vocabulary the LM head is a third of a small student's step, so the
second pass costs about 20% of a distillation step. Here each chunk's student and teacher logits are formed once,
both terms are read from them, and one combined gradient is folded into the hidden-state and weight gradients. A
term of weight 0 adds no gradient work (its value is still reported, which costs no matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.losses.fused import (
    _apply, _blockwise, _chunk_tokens, _ChunkLogits, _divergence_value_and_grad, _floor_, _log_softmax_and_softmax_,
)
from distil.losses.fused_inputs import _head_pair, _kept_labels

__all__ = ["fused_linear_kd_and_ce"]


def fused_linear_kd_and_ce(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    kd_weight: float,
    ce_weight: float,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    **divergence_params: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kd, ce)`` with ``loss = kd_weight * kd + ce_weight * ce``, differentiable; ``kd`` and ``ce`` detached.

    ``kd`` is :func:`~distil.losses.fused_linear_divergence` (no T**2 factor: put it in ``kd_weight``) and ``ce`` is
    :func:`~distil.losses.fused_linear_cross_entropy` at temperature 1, both averaged over the positions whose label
    is not ``ignore_index`` (0 with a zero gradient when there are none). ``labels`` has the hidden states' leading
    shape, already aligned (next-token prediction: hidden ``[:, :-1]``, labels ``[:, 1:]``); student labels index
    the student's vocabulary, and the divergence runs over the first ``vocab_size`` rows of both heads.
    """
    lead = student_hidden.shape[:-1]
    keep, targets = _kept_labels(labels, lead, student_weight.shape[0], ignore_index)
    if kd_weight < 0 or ce_weight < 0:
        raise DistilError(f"kd_weight and ce_weight must be >= 0, got {kd_weight} and {ce_weight}")
    pair = _head_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature,
                      keep.reshape(lead), vocab_size, divergence_params)
    # The CE runs over the student's whole head; the divergence over the shared vocabulary.
    full_head = student_weight.shape[0] != pair.vocab_size
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32

    # At temperature 1 both terms read the same student log-softmax: formed once, in the logits' own buffer.
    block = _shared_block if temperature == 1.0 and not full_head else _separate_block
    logits = _ChunkLogits(acc)
    sums = []  # per chunk: (kd, ce) summed

    def step(h: torch.Tensor, start: int, end: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Grad mode is off here: no graph. Each block of rows leaves its gradient in the student's logits buffer.
        z_s, z_t = logits("student", h, student_weight), logits("teacher", pair.ht[start:end], pair.wt)
        kd_ce = _blockwise(block, z_s, z_t, targets[start:end].unsqueeze(-1), kernel=pair.kernel,
                           params=pair.params, vocab_size=pair.vocab_size, temperature=temperature,
                           kd_weight=kd_weight, ce_weight=ce_weight, want_grad=want_grad)
        sums.append(kd_ce)
        return kd_weight * kd_ce[0] + ce_weight * kd_ce[1], z_s if want_grad else None

    loss = _apply(pair.hs, student_weight, _chunk_tokens(chunk_size, student_weight.shape[0]), step, "mean")
    count = max(pair.hs.shape[0], 1)
    kd, ce = torch.stack(sums).sum(0) / count if sums else loss.new_zeros(2)
    return loss, kd.to(loss.dtype), ce.to(loss.dtype)


def _separate_block(z: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, *, kernel, params, vocab_size: int,
                    temperature: float, kd_weight: float, ce_weight: float, want_grad: bool) -> torch.Tensor:
    """(kd, ce) summed over the rows; z (the student's whole head) becomes the combined gradient."""
    lse = z.logsumexp(-1, keepdim=True)
    ce = (lse - z.gather(-1, y)).sum()
    ce_grad = None
    if want_grad and ce_weight:  # softmax - onehot, before the divergence consumes z
        ce_grad = (z - lse).exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=z.dtype))
    full_head = z.shape[1] != vocab_size
    z_kd = z[:, :vocab_size] if full_head else z
    kd, grad = _divergence_value_and_grad(kernel, params, [z_kd, z_t], temperature, want_grad and kd_weight > 0)
    if want_grad:
        if grad is not None:
            grad.mul_(kd_weight)
            if full_head:  # rows beyond the shared vocabulary get the CE gradient only
                grad = F.pad(grad, (0, z.shape[1] - vocab_size))
        if ce_grad is not None:
            grad = ce_grad.mul_(ce_weight) if grad is None else grad.add_(ce_grad, alpha=ce_weight)
        if grad is None:  # both weights 0: a zero gradient
            z.zero_()
        else:
            z.copy_(grad)
    return torch.stack((kd, ce))


def _shared_block(z: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, *, kernel, params, vocab_size: int,
                  temperature: float, kd_weight: float, ce_weight: float, want_grad: bool) -> torch.Tensor:
    """As _separate_block at temperature 1 over one vocabulary: one student log-softmax serves both terms."""
    lp_s, p_s = _log_softmax_and_softmax_(z)
    ce = -lp_s.gather(-1, y).sum()
    lp_t, p_t = _log_softmax_and_softmax_(z_t)
    excluded = _floor_(lp_s)  # -inf student logits: floored, and they get no gradient (as in the plain path)
    _floor_(lp_t)
    values, g = kernel(lp_s, lp_t, p_s, p_t, **params)
    kd = values.sum()
    if want_grad:
        # d/dz [kd_weight * KD + ce_weight * CE] = kd_weight * (g - p_s * sum(g)) + ce_weight * (p_s - onehot(y)),
        # through lp_s = log_softmax(z): one pass over the block, in g's buffer, then into z's.
        if excluded is not None:
            g.masked_fill_(excluded, 0.0)
            p_s.masked_fill_(excluded, 0.0)
        coef = ce_weight - kd_weight * g.sum(-1, keepdim=True)
        grad = g.mul_(kd_weight).addcmul_(p_s, coef)
        z.copy_(grad.scatter_add_(-1, y, torch.full_like(y, -ce_weight, dtype=z.dtype)))
    return torch.stack((kd, ce))
