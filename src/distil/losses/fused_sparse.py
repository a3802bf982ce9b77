"""Cached (sparse) teacher targets and cross-entropy in ONE chunked pass over the student's LM head.

The plain cache-fed loss materialises the student's ``[tokens, vocab]`` logits and log-softmax, where the CE and live
teacher paths use the chunked LM-head losses of :mod:`distil.losses.fused`. Here each chunk's student logits are
formed once (no teacher: its targets come from the cache), and two passes over blocks of their rows give

1. each row's log-normaliser, the student's log-probabilities at the stored ids and, for top-k targets with a tail,
   the student's exact mass outside them (summed over the tail tokens themselves, so even a peaked student's tail is
   exact), plus the CE;
2. after the bucket divergence and its gradient with respect to those few ``[chunk, k + 1]`` log-probabilities
   (autograd on tiny tensors, the formulas of :mod:`distil.losses.sparse`), the gradient with respect to the logits,
   written over them and folded into the hidden-state and weight gradients as the other fused losses do.

With ``lq`` the student's bucket log-probabilities, ``g = d loss / d lq``, ``G = sum(g)`` over a row's buckets and
``Q`` its tail mass, the gradient with respect to the softened logits is ``q_v * (g_tail / Q - G)`` for a token
outside the stored set and ``g_v - q_v * G`` for a stored one (``q = softmax(z / T)``): one more exp pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch

from distil.errors import DistilError
from distil.losses import fused
from distil.losses.cached import resolve_cached
from distil.losses.fused import _apply, _chunk_tokens, _ChunkLogits
from distil.losses.fused_inputs import _check_head, _flat_rows, _kept_labels
from distil.losses.sparse import _floor, bucket_divergence, divergence_kind

__all__ = ["FUSED_CACHE_MODES", "cache_mode", "fused_linear_cached_kd_and_ce"]

FUSED_CACHE_MODES = ("topk", "sample")  # a "full" cache holds [tokens, vocab] anyway: it takes the plain path


def cache_mode(targets: Mapping[str, torch.Tensor]) -> str:
    """The mode of a batch of ``TeacherCache.targets(...)``: "topk", "sample" or "full"."""
    return "sample" if "weights" in targets else "topk" if "ids" in targets else "full"


def fused_linear_cached_kd_and_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    kd_weight: float,
    ce_weight: float,
    divergence: str = "forward_kl",
    temperature: float | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    **divergence_params: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kd, ce)`` with ``loss = kd_weight * kd + ce_weight * ce``, differentiable; ``kd`` and ``ce`` detached.

    ``kd`` equals :func:`~distil.losses.cached_divergence` of the student's logits ``(hidden @ weight.T)[..., :V]``
    against ``targets`` (a top-k or sampled batch of ``TeacherCache.targets``, aligned with ``hidden``'s leading
    shape) over the positions kept by both ``targets["mask"]`` and the labels; ``ce`` is the next-token CE over the
    whole head, averaged over the labelled positions (0 with a zero gradient when there are none). ``V`` is
    ``vocab_size`` (the cache's vocabulary; None: the head's). ``temperature`` None takes the cache's.
    """
    lead = hidden.shape[:-1]
    _check_head("student", hidden, weight)
    keep, y = _kept_labels(labels, lead, weight.shape[0], ignore_index)
    if kd_weight < 0 or ce_weight < 0:
        raise DistilError(f"kd_weight and ce_weight must be >= 0, got {kd_weight} and {ce_weight}")
    mode = cache_mode(targets)
    if mode not in FUSED_CACHE_MODES:
        raise DistilError("a full-distribution cache has no fused path: use cached_divergence on the logits")
    spec, params, T, t = resolve_cached(targets, divergence, temperature, divergence_params, hidden.device)
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab <= weight.shape[0]:
        raise DistilError(f"vocab_size={vocab} must be in 1..{weight.shape[0]} (the student head's rows)")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = _flat_targets(t, mode, lead, keep, vocab, acc)
    kind = divergence_kind(spec.sparse, params.get("beta", 0.5))
    if kind != "forward" and mode == "topk" and rows.tail is None:
        raise DistilError(f"the sparse {kind} divergence needs tail_logmass (the teacher's mass outside the stored "
                          "ids); build the cache in topk mode, which stores it, or use forward_kl")
    n_kd, n_ce = int(rows.kd_row.sum()), int(y.numel())
    # Both means folded into the weights: the chunk loop sums, and a zero-weight term adds no gradient work.
    kd_w, ce_w = kd_weight / max(n_kd, 1), ce_weight / max(n_ce, 1)
    logits = _ChunkLogits(acc)
    sums: list[torch.Tensor] = []  # per chunk: (kd, ce) summed

    def step(h: torch.Tensor, start: int, end: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = logits("student", h, weight)
        chunk = rows.slice(start, end)
        y_chunk = y[start:end].unsqueeze(-1)
        row_sums = _row_sums(z, chunk, y_chunk, vocab, T)
        kd, g, g_tail = _bucket_value_and_grad(kind, params.get("beta", 0.5), chunk, row_sums.lq, row_sums.tail,
                                               want_grad and kd_weight > 0)
        sums.append(torch.stack((kd, row_sums.ce)))
        if want_grad:
            _write_gradient(z, chunk, y_chunk, row_sums, g, g_tail, vocab, T, kd_w, ce_w)
        return kd_w * kd + ce_w * row_sums.ce, z if want_grad else None

    loss = _apply(_flat_rows(hidden, keep), weight, _chunk_tokens(chunk_size, weight.shape[0]), step, "sum")
    kd, ce = torch.stack(sums).sum(0) if sums else loss.new_zeros(2)
    return loss, (kd / max(n_kd, 1)).to(loss.dtype), (ce / max(n_ce, 1)).to(loss.dtype)


@dataclass
class _Targets:
    """The cached targets of the labelled rows, flattened to ``[N, k]`` (or ``[N]``), as the chunk steps read them."""

    mode: str
    kd_row: torch.Tensor  # which rows have a target
    ids: torch.Tensor  # stored (top-k) or drawn (sampled) token ids
    teacher: torch.Tensor  # the teacher's log-probabilities at the ids (top-k) or count / draws (sampled)
    valid: torch.Tensor  # which entries are real (not padding)
    in_set: torch.Tensor  # which entries belong to the stored set (the first always does, as in the plain path)
    tail: torch.Tensor | None  # the teacher's log mass outside the ids (top-k)
    entropy: torch.Tensor | None  # the teacher's entropy (sampled)

    def slice(self, start: int, end: int) -> "_Targets":
        return replace(self, **{f.name: getattr(self, f.name)[start:end] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def _flat_targets(t: dict[str, torch.Tensor], mode: str, lead: torch.Size, keep: torch.Tensor, vocab: int,
                  acc: torch.dtype) -> _Targets:
    mask = t["mask"]
    if mask.shape != lead:
        raise DistilError(f"cached targets cover positions {tuple(mask.shape)}, the hidden states {tuple(lead)}; "
                          "slice them alike (next-token prediction: [:, :-1] of both)")

    def flat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(-1, *x.shape[len(lead):])[keep]

    ids = flat(t["ids"]).long()
    # Checked on the CPU only: on an accelerator the check would synchronise every step.
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise DistilError(f"the cached targets hold token ids outside the student's vocabulary of {vocab}")
    if mode == "sample":
        teacher = flat(t["weights"]).to(acc)  # 0 in padding
        valid, tail, entropy = teacher > 0, None, flat(t.get("entropy"))
    else:
        teacher, entropy = flat(t["logprobs"]).to(acc), None
        valid, tail = teacher > -torch.inf, flat(t.get("tail_logmass"))
        if tail is not None:  # as the plain path: padding repeats the row's first id, which always counts as stored
            ids = torch.where(valid, ids, ids[:, :1])
    in_set = valid.clone()
    in_set[:, :1] = True
    return _Targets(mode, flat(mask), ids, teacher, valid, in_set, None if tail is None else tail.to(acc),
                    None if entropy is None else entropy.to(acc))


def _soft(zb: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    """A block's KD logits: the first ``vocab`` columns, softened (a view when there is nothing to do)."""
    z = zb[:, :vocab] if vocab != zb.shape[1] else zb
    return z if temperature == 1.0 else z / temperature


def _shares_ce(z: torch.Tensor, vocab: int, temperature: float) -> bool:
    """Whether the KD's softmax is the CE's (temperature 1 over the whole head)."""
    return temperature == 1.0 and vocab == z.shape[1]


@dataclass
class _RowSums:
    """Pass 1's results for a chunk's rows, with ``e = exp(z / T - top)`` (the row's largest softened logit)."""

    top: torch.Tensor  # [c]
    total: torch.Tensor  # sum(e) [c]
    lq: torch.Tensor  # the student's log-probabilities at the ids [c, k]
    tail: torch.Tensor | None  # log(outside / total): the student's log mass outside the stored ids [c]
    outside: torch.Tensor | None  # sum(e) over the tokens outside the stored ids [c]
    stored: torch.Tensor | None  # sum(e) over the stored ids [c]
    ce_lse: torch.Tensor  # the CE's log-normaliser [c]
    ce: torch.Tensor  # the summed CE


def _row_sums(z: torch.Tensor, t: _Targets, y: torch.Tensor, vocab: int, temperature: float) -> _RowSums:
    """Pass 1, over blocks of rows (``z`` is left as it was). The tail is summed over the tail tokens themselves,
    so that it is exact however little mass it holds, and pass 2 reuses the same exponentials, so that each tail
    token's share of the tail (``e_v / outside``) is exact too."""
    c = z.shape[0]
    top, total, lq = z.new_empty(c), z.new_empty(c), z.new_empty(t.ids.shape)
    outside, stored = (z.new_empty(c), z.new_empty(c)) if t.tail is not None else (None, None)
    shared = _shares_ce(z, vocab, temperature)
    ce_lse = z.new_empty(c)
    for rows in fused._row_blocks(c, z.shape[1], z.device):
        zb, ids = z[rows], t.ids[rows]
        zk = _soft(zb, vocab, temperature)
        m = zk.amax(-1, keepdim=True)
        e = (zk - m).exp_()
        s = e.sum(-1, keepdim=True)
        top[rows], total[rows] = m.squeeze(-1), s.squeeze(-1)
        lq[rows] = zk.gather(-1, ids) - m - s.log()
        if outside is not None:
            stored[rows] = torch.where(t.in_set[rows], e.gather(-1, ids), 0.0).sum(-1)
            outside[rows] = e.scatter_(-1, ids, 0.0).sum(-1)
        ce_lse[rows] = (m + s.log()).squeeze(-1) if shared else zb.logsumexp(-1)
    ce = (ce_lse - z.gather(-1, y).squeeze(-1)).sum() if c else z.new_zeros(())
    tail = None if outside is None else outside.log() - total.log()
    return _RowSums(top, total, lq, tail, outside, stored, ce_lse, ce)


def _bucket_value_and_grad(kind: str, beta: float, t: _Targets, lq: torch.Tensor, tail: torch.Tensor | None,
                           want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed divergence over the KD rows, and its gradient with respect to ``lq`` and ``tail`` (or Nones)."""
    with torch.enable_grad():
        lq = lq.detach().requires_grad_(want_grad)
        tail = None if tail is None else tail.detach().requires_grad_(want_grad)
        if t.mode == "sample":  # an unbiased estimate of the cross-entropy (minus the teacher's entropy: the KL)
            values = -(t.teacher * _floor(lq)).sum(-1)
            if t.entropy is not None:
                values = values - t.entropy
        elif tail is None:
            values = bucket_divergence(kind, t.teacher, lq, t.valid)
        else:
            ones = torch.ones_like(t.valid[:, :1])
            values = bucket_divergence(kind, torch.cat([t.teacher, t.tail.unsqueeze(-1)], -1),
                                       torch.cat([lq, tail.unsqueeze(-1)], -1), torch.cat([t.valid, ones], -1),
                                       beta)
        total = torch.where(t.kd_row, values, 0.0).sum()
        if not want_grad:
            return total.detach(), None, None
        grads = torch.autograd.grad(total, [lq] if tail is None else [lq, tail])
    return total.detach(), grads[0], (grads[1] if tail is not None else None)


def _write_gradient(z, t: _Targets, y, r: _RowSums, g, g_tail, vocab: int, temperature: float, kd_w: float,
                    ce_w: float) -> None:
    """Pass 2, over blocks of rows: overwrite ``z`` with ``d (kd_w * kd + ce_w * ce) / d z``."""
    if g is None:  # no KD gradient (weight 0)
        g = torch.zeros_like(r.lq)
    q_ids = r.lq.exp()
    if g_tail is None:  # q_v * coef for every token, plus g at the ids (padding entries have g = 0)
        at_ids, coef = g, -g.sum(-1)
    else:
        # q_v * (g_tail / Q - G) outside the stored set, overwritten by g_v - q_v * G at the stored ids. The first
        # coefficient is written as g_tail * stored / outside - sum(g): the form g_tail / Q - G would cancel when
        # the tail holds nearly all the student's mass.
        coef = torch.where(r.outside > 0, g_tail * r.stored / r.outside, 0.0) - g.sum(-1)
        at_ids = g - q_ids * (g.sum(-1) + g_tail).unsqueeze(-1)
        at_ids = torch.where(t.in_set, at_ids, at_ids[:, :1])  # padding repeats the first id: the same value
    shared = _shares_ce(z, vocab, temperature)
    for rows in fused._row_blocks(z.shape[0], z.shape[1], z.device):
        zb, ids, yb = z[rows], t.ids[rows], y[rows]
        top, coef_b, total = r.top[rows].unsqueeze(-1), coef[rows].unsqueeze(-1), r.total[rows].unsqueeze(-1)
        if shared:  # one softmax serves both terms: q = e / total
            e = zb.sub_(top).exp_()
            if g_tail is None:
                e.mul_((coef_b * kd_w + ce_w) / total).scatter_add_(-1, ids, at_ids[rows] * kd_w)
            else:  # the stored ids' entries are overwritten: their CE part goes with them
                e.mul_((coef_b * kd_w + ce_w) / total).scatter_(-1, ids, at_ids[rows] * kd_w + q_ids[rows] * ce_w)
            e.scatter_add_(-1, yb, torch.full_like(yb, -ce_w, dtype=zb.dtype))
            continue
        # Separate softmaxes: the KD's over the first `vocab` columns at temperature T, the CE's over all at 1.
        zk = _soft(zb, vocab, temperature)
        kd = (zk - top).exp_().mul_(coef_b / total)
        kd = kd.scatter_add_(-1, ids, at_ids[rows]) if g_tail is None else kd.scatter_(-1, ids, at_ids[rows])
        kd.mul_(kd_w / temperature)
        zb.sub_(r.ce_lse[rows].unsqueeze(-1)).exp_().mul_(ce_w)
        zb.scatter_add_(-1, yb, torch.full_like(yb, -ce_w, dtype=zb.dtype))
        zb[:, :vocab].add_(kd)
