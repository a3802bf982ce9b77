"""Attention losses for transformers: attention-map KL per head, and MiniLMv2 self-attention relations.

Pure functions, arguments (student, teacher, ...). Attention probabilities come from eager models
(`output_attentions=True`) or from `distil.distill.attention.AttentionRecorder` on SDPA / flash models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from distil.errors import DistilError

HeadMap = str | Sequence[int | Sequence[int]]


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _kl_rows(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """sum_k t * (log t - log s) over the last dim, with 0 * log 0 = 0 and no NaN gradient where t = 0."""
    t = teacher_log.exp()
    keep = t > 0
    diff = torch.where(keep, teacher_log - student_log, torch.zeros_like(t))
    return (t * diff).sum(dim=-1)


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    # log(0) only where the probability is exactly 0; those entries are dropped by _kl_rows when the teacher's is 0.
    return torch.where(p > 0, p, torch.ones_like(p)).log().masked_fill(p <= 0, float("-inf"))


def _row_mean(per_row: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """per_row [B, H, Q]; mask [B, Q] keeps query positions. Mean over kept rows; 0 (zero grad) if none."""
    if mask is None:
        return per_row.mean()
    if mask.shape != (per_row.shape[0], per_row.shape[2]):
        raise DistilError(f"attention mask shape {list(mask.shape)} must be [batch, query] = "
                          f"{[per_row.shape[0], per_row.shape[2]]}")
    keep = mask.bool()[:, None, :].expand_as(per_row)
    total = torch.where(keep, per_row, torch.zeros_like(per_row)).sum()
    return total / keep.sum().clamp_min(1)


def _map_heads(probs: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    return torch.stack([probs[:, g].mean(dim=1) for g in groups], dim=1)


def attention_kl(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    head_map: HeadMap = "average",
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions [B, H, Q, K], averaged over heads and kept queries.

    head_map:
      "average"  -- average the heads of each model into one distribution (any head counts);
      "per_head" -- student head h against teacher head h (equal head counts);
      a list of length H_student whose entry h is a teacher head index, or a list of teacher heads whose
                    average is student head h's target.
    mask [B, Q]: True/1 keeps a query position (padding queries are excluded; padded keys already have probability 0
    on both sides). An all-masked batch gives 0 with zero gradient.
    """
    if student_probs.dim() != 4 or teacher_probs.dim() != 4:
        raise DistilError(f"attention_kl needs probabilities [batch, heads, query, key], got student "
                          f"{list(student_probs.shape)} and teacher {list(teacher_probs.shape)}")
    b, hs, q, k = student_probs.shape
    ht = teacher_probs.shape[1]
    if (teacher_probs.shape[0], teacher_probs.shape[2], teacher_probs.shape[3]) != (b, q, k):
        raise DistilError(f"attention_kl: student {list(student_probs.shape)} and teacher "
                          f"{list(teacher_probs.shape)} differ in batch or sequence length")
    s, t = _float(student_probs), _float(teacher_probs)
    if isinstance(head_map, str):
        if head_map == "average":
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        elif head_map == "per_head":
            if hs != ht:
                raise DistilError(f"head_map 'per_head' needs equal head counts, got student {hs} and teacher {ht}; "
                                  "use 'average' or an explicit list of teacher heads per student head")
        else:
            raise DistilError(f"unknown head_map {head_map!r}; use 'average', 'per_head' or a list")
    else:
        groups = [[g] if isinstance(g, int) else list(g) for g in head_map]
        if len(groups) != hs or any(not g for g in groups):
            raise DistilError(f"head_map must give one non-empty teacher head (or list of heads) per student head: "
                              f"{hs} entries, got {list(head_map)!r}")
        bad = [h for g in groups for h in g if not (isinstance(h, int) and 0 <= h < ht)]
        if bad:
            raise DistilError(f"head_map refers to teacher heads {bad}; the teacher has heads 0..{ht - 1}")
        t = _map_heads(t, groups)
    return _row_mean(_kl_rows(_safe_log(s), _safe_log(t)), mask)


def _relation_logits(x: torch.Tensor, num_heads: int, key_mask: torch.Tensor | None, what: str) -> torch.Tensor:
    """x [B, S, D] -> log softmax(X_r X_r^T / sqrt(d_r)) per relation head: [B, R, S, S]."""
    bsz, seq, width = x.shape
    if width % num_heads:
        raise DistilError(f"minilm_relations: {what} width {width} is not divisible by num_relation_heads={num_heads}; "
                          "choose a number of relation heads that divides both models' widths")
    d = width // num_heads
    xr = _float(x).reshape(bsz, seq, num_heads, d).transpose(1, 2)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        # finfo.min, not -inf: a row with no valid key stays finite (it is excluded by the query mask anyway).
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(dim=-1)


def minilm_relations(
    student_qkv: Sequence[torch.Tensor],
    teacher_qkv: Sequence[torch.Tensor],
    *,
    num_relation_heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation distillation (Wang et al. 2021).

    student_qkv / teacher_qkv: the same number of tensors [B, S, D] in the same order -- usually (queries, keys,
    values), each the concatenation of all heads (the raw q/k/v projection outputs). Each is split into
    `num_relation_heads` relation heads of width d_r = D / R; relation = softmax(X_r X_r^T / sqrt(d_r)); the loss is
    KL(teacher relation || student relation), averaged over relation heads and kept query positions, and summed over
    the tensors (Q-Q + K-K + V-V, as in the paper). Widths and attention head counts may differ between the models;
    only R must divide both widths. mask [B, S]: True/1 marks real tokens; padded tokens are dropped both as queries
    and as keys.
    """
    if len(student_qkv) != len(teacher_qkv) or not student_qkv:
        raise DistilError(f"minilm_relations needs the same non-zero number of student and teacher tensors, got "
                          f"{len(student_qkv)} and {len(teacher_qkv)}")
    if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise DistilError(f"num_relation_heads must be a positive integer, got {num_relation_heads!r}")
    key_mask = None if mask is None else mask.bool()
    total = None
    for i, (s, t) in enumerate(zip(student_qkv, teacher_qkv)):
        if s.dim() != 3 or t.dim() != 3 or s.shape[:2] != t.shape[:2]:
            raise DistilError(f"minilm_relations tensor {i}: student {list(s.shape)} and teacher {list(t.shape)} "
                              "must both be [batch, seq, width] with the same batch and sequence length")
        if key_mask is not None and key_mask.shape != s.shape[:2]:
            raise DistilError(f"minilm_relations mask shape {list(key_mask.shape)} must be {list(s.shape[:2])}")
        s_log = _relation_logits(s, num_relation_heads, key_mask, "student")
        t_log = _relation_logits(t, num_relation_heads, key_mask, "teacher")
        term = _row_mean(_kl_rows(s_log, t_log), key_mask)
        total = term if total is None else total + term
    return total
