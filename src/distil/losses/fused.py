"""Chunked LM-head losses: the loss of ``hidden @ weight.T`` without ever holding the ``[tokens, vocab]`` logits.

For a 128k vocabulary and 4k tokens the fp32 logits of ONE model take 2 GiB, and the plain autograd path keeps several
tensors of that size alive at once (logits, softened logits, log-probabilities, their gradients). Here positions are
processed ``chunk_size`` tokens at a time: the student's logits for the chunk, the teacher's under no-grad, the
chunk's summed loss and, in the same pass, the gradient with respect to the chunk's logits, which is folded straight
into the gradients of the student's hidden states and LM-head weight. Only those two gradients are kept for
backward, which merely scales them by the incoming gradient.

Each model's chunk logits land in one buffer reused chunk after chunk, and the elementwise work (softmax, divergence,
gradient) runs over blocks of a few rows at a time, writing the gradient back over the student's logits: the
temporaries stay block-sized and in cache while the matmuls still see the whole chunk. Peak memory: two
``chunk_size x vocab`` buffers (one for the cross-entropy) plus the weight gradient.

The divergences are those of :mod:`distil.losses.logits` (same values, same conventions: no T**2 factor inside,
mean over kept positions, teacher treated as a constant). ``torch.autograd.gradcheck`` passes; double backward is not
supported.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.losses.fused_inputs import _check_head, _flat_rows, _head_pair, _kept_labels
from distil.losses.logits import LOG_PROB_FLOOR
from distil.losses.registry import REGISTRY

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "fused_linear_cross_entropy", "fused_linear_divergence"]

# Default chunk: about this many logits per chunk (128 MiB in fp32): 261 tokens at a 128k vocabulary, 682 at 49k,
# 1,024 at 32k. Larger chunks run the matmuls a little faster and cost memory (benchmarks/fused_memory.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 25

# Elementwise work runs over blocks of about this many logits (1 MiB in fp32): small enough to stay in cache, large
# enough that a block's dozen operator calls cost little next to their arithmetic.
BLOCK_ELEMENTS = 1 << 18

# A chunk step: (student hidden rows of the chunk, start, end, want gradient) -> (summed loss, d loss / d logits or
# None). It computes the chunk's logits itself, so that nothing outside it keeps them alive.
_ChunkStep = Callable[[torch.Tensor, int, int, bool], "tuple[torch.Tensor, torch.Tensor | None]"]


def _chunk_tokens(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise DistilError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    return chunk_size


def _run_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, chunk: int, step: _ChunkStep, grads: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum the loss over chunks of rows of ``hidden``; accumulate d/d hidden and d/d weight when asked."""
    need_h, need_w = grads
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None  # row-major
    # The weight gradient sums over every token: accumulate it in fp32 even for bf16 weights.
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        h = hidden[start:end]
        loss, g = step(h, start, end, need_h or need_w)
        total += loss
        if g is None:
            continue
        if grad_h is not None:
            torch.mm(g.to(weight.dtype), weight, out=grad_h[start:end])
        if grad_w is not None:
            grad_w.addmm_(g.t(), h.to(acc))
    return total, grad_h, grad_w


class _ChunkLogits:
    """Each model's ``[chunk, vocab]`` logits in the compute dtype, written by the chunk's matmul into one buffer per
    model that is reused chunk after chunk (a fresh buffer of that size per chunk costs its page faults each time).
    The steps overwrite the student's with the gradient, block by block."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = hidden.new_empty((rows, weight.shape[0]), dtype=self.dtype)
        out = buffer[:rows]
        if hidden.dtype == self.dtype:
            torch.mm(hidden, weight.t(), out=out)
        else:  # a bf16/fp16 head: its matmul, then one conversion into the buffer
            out.copy_(F.linear(hidden, weight))
        return out


def _row_blocks(rows: int, vocab: int, device: torch.device) -> Iterator[slice]:
    """Slices of at most ``BLOCK_ELEMENTS // vocab`` rows (at least one) covering ``range(rows)``; on an accelerator
    one slice (the whole chunk): a GPU has no cache to keep a block in, and thousands of tiny kernels a step would
    cost more in launches than the elementwise work itself."""
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1)) if device.type == "cpu" else max(rows, 1)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _blockwise(block: Callable, z_s: torch.Tensor, *others: torch.Tensor, **static) -> torch.Tensor:
    """The sum of ``block(z_s, *others, **static)`` over the blocks of rows of a chunk. A block leaves its gradient
    in its rows of ``z_s`` and returns its summed value(s)."""
    total = None
    for rows in _row_blocks(z_s.shape[0], z_s.shape[1], z_s.device):
        value = block(z_s[rows], *(t[rows] for t in others), **static)
        total = value if total is None else total + value
    return total


def _divergence_block(z_s: torch.Tensor, z_t: torch.Tensor, *, kernel: Callable, params: dict, temperature: float,
                      want_grad: bool) -> torch.Tensor:
    value, grad = _divergence_value_and_grad(kernel, params, [z_s, z_t], temperature, want_grad)
    if grad is not None:
        z_s.copy_(grad)
    return value


def _cross_entropy_block(z: torch.Tensor, y: torch.Tensor, *, want_grad: bool) -> torch.Tensor:
    """Summed CE of the rows of z against y ([rows, 1]); z becomes softmax - onehot, all in place."""
    z.sub_(z.amax(-1, keepdim=True))
    picked = z.gather(-1, y)
    total = z.exp_().sum(-1, keepdim=True)
    loss = (total.log() - picked).sum()
    if want_grad:
        z.div_(total).scatter_add_(-1, y, torch.full_like(y, -1, dtype=z.dtype))
    return loss


class _Fused(torch.autograd.Function):
    """Inputs: the kept student hidden rows ``[N, H]`` and the weight ``[V', H]``; the chunk loop does the rest."""

    @staticmethod
    def forward(ctx, hidden, weight, chunk, step, scale, need_h, need_w):  # type: ignore[override]
        total, grad_h, grad_w = _run_chunks(hidden, weight, chunk, step, (need_h, need_w))
        if grad_h is not None:
            grad_h.mul_(scale)
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(weight.dtype)
        ctx.grads = (grad_h, grad_w)  # intermediate results, not inputs or outputs: held on ctx directly
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        if _graph_is_kept():  # backward may run again (retain_graph=True, gradcheck): leave the stored grads intact
            return _scaled(grad_h, grad_out), _scaled(grad_w, grad_out), None, None, None, None, None
        # Last use: scale in place and hand the tensors over; autograd adopts them as .grad without a copy, which
        # spares one weight-sized tensor at the peak.
        ctx.grads = None
        return _scaled(grad_h, grad_out, True), _scaled(grad_w, grad_out, True), None, None, None, None, None


def _scaled(grad: torch.Tensor | None, by: torch.Tensor, in_place: bool = False) -> torch.Tensor | None:
    if grad is None:
        return None
    by = by.to(grad.dtype)
    return grad.mul_(by) if in_place else grad * by


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when torch cannot tell."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


def _apply(hidden: torch.Tensor, weight: torch.Tensor, chunk: int, step: _ChunkStep, reduction: str) -> torch.Tensor:
    if reduction not in ("mean", "sum"):
        raise DistilError(
            f"the fused loss supports reduction 'mean' or 'sum', got {reduction!r}; per-token values need the plain "
            "path (materialised logits and a distil.losses divergence)"
        )
    scale = 1.0 / max(hidden.shape[0], 1) if reduction == "mean" else 1.0
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    # Under autocast the chunk matmuls keep the inputs' own dtypes: the in-place and out= accumulations need them.
    with torch.autocast(hidden.device.type, enabled=False):
        if not (need_h or need_w):  # evaluation: no gradient work at all
            with torch.no_grad():
                return _run_chunks(hidden, weight, chunk, step, (False, False))[0] * scale
        return _Fused.apply(hidden, weight, chunk, step, scale, need_h, need_w)


# plain function -> fused kernel, for the tests that compare the two
_KERNELS = {d.plain: d.kernel for d in REGISTRY.values()}


def _log_softmax_and_softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(z), softmax(z)) over the last dimension; the first overwrites ``z``. Fewer passes and one fresh
    buffer instead of three: at a 49k vocabulary each buffer is tens of MB, and a fresh one costs page faults."""
    z.sub_(z.amax(-1, keepdim=True))
    p = z.exp()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    return z.sub_(total.log_()), p


def _log_probs_and_probs(logits: torch.Tensor, temperature: float, acc: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / T) and softmax(logits / T) in the compute dtype. Consumes ``logits`` (a chunk's fresh
    matmul)."""
    z = logits.to(acc)
    if temperature != 1.0:
        z.div_(temperature)
    return _log_softmax_and_softmax_(z)


def _floor_(lp: torch.Tensor) -> torch.Tensor | None:
    """Replace -inf log-probabilities by LOG_PROB_FLOOR in place; return where they were (None if nowhere).

    Logits from a matmul are finite in practice, so a read-only check usually spares writing a mask."""
    if lp.numel() == 0 or lp.min() > -math.inf:
        return None
    where = lp == -math.inf
    lp.masked_fill_(where, LOG_PROB_FLOOR)
    return where


def _divergence_value_and_grad(kernel, params, logits: list[torch.Tensor], temperature, want_grad):
    """Summed divergence of a chunk and its gradient with respect to the student's logits (or None).

    ``logits`` is ``[student, teacher]``; the list is emptied so that the raw logits are freed once converted."""
    acc = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    lp_t, p_t = _log_probs_and_probs(logits.pop(), temperature, acc)
    lp_s, p_s = _log_probs_and_probs(logits.pop(), temperature, acc)
    excluded = _floor_(lp_s)  # student -inf logits: floored, and they get no gradient (as in the plain path)
    _floor_(lp_t)
    values, g = kernel(lp_s, lp_t, p_s, p_t, **params)
    if not want_grad:
        return values.sum(), None
    del lp_s, lp_t, p_t
    # Through lp_s = log_softmax(z / T): dz = (g - softmax(z / T) * sum(g)) / T.
    if excluded is not None:
        g.masked_fill_(excluded, 0.0)
        p_s.masked_fill_(excluded, 0.0)
    g.sub_(p_s.mul_(g.sum(-1, keepdim=True)))
    if temperature != 1.0:
        g.div_(temperature)
    return values.sum(), g


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    vocab_size: int | None = None,
    **divergence_params: float,
) -> torch.Tensor:
    """A :data:`distil.losses.DIVERGENCES` divergence between ``softmax(student_hidden @ student_weight.T / T)`` and
    the teacher's, computed chunk by chunk so that neither model's full logits ever exist.

    Args:
        student_hidden, teacher_hidden: final hidden states ``[..., H_s]`` and ``[..., H_t]`` with the same leading
            dimensions (the caller aligns positions, e.g. drops the last one for next-token prediction).
        student_weight, teacher_weight: LM-head weights ``[V, H_s]`` and ``[V, H_t]``. The teacher side gets no
            gradient (it is a constant).
        divergence: a name in ``DIVERGENCES`` (forward_kl, reverse_kl, generalized_jsd / jsd, skew_kl,
            skew_reverse_kl, tvd); ``divergence_params`` its parameters (``beta``, ``alpha``), defaulting to the
            plain function's (:data:`distil.losses.registry.REGISTRY`).
        mask: bool, the leading shape; only kept positions count (dropped before any matmul).
        chunk_size: tokens per chunk; None picks ``DEFAULT_CHUNK_ELEMENTS // vocab`` (128 MiB of fp32 logits).
        reduction: "mean" over kept positions (0 with a zero gradient when none is kept) or "sum".
        vocab_size: compare over the first ``vocab_size`` rows of both heads only, for vocabularies that differ by
            padding rows (e.g. 151,936 vs 152,064); required when the two heads differ in size.

    Equal to the plain path ``DIVERGENCES[divergence](h_s @ W_s.T, h_t @ W_t.T, ...)`` up to float rounding; no T**2
    factor. Gradients reach ``student_hidden`` and ``student_weight`` only.
    """
    pair = _head_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature, mask,
                      vocab_size, divergence_params)

    logits = _ChunkLogits(torch.float64 if student_hidden.dtype == torch.float64 else torch.float32)

    def step(h: torch.Tensor, start: int, end: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Grad mode is off here (no_grad or inside _Fused.forward): these matmuls build no graph.
        z_s, z_t = logits("student", h, pair.ws), logits("teacher", pair.ht[start:end], pair.wt)
        total = _blockwise(_divergence_block, z_s, z_t, kernel=pair.kernel, params=pair.params,
                           temperature=temperature, want_grad=want_grad)
        return total, z_s if want_grad else None

    return _apply(pair.hs, pair.ws, _chunk_tokens(chunk_size, pair.vocab_size), step, reduction)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked like :func:`fused_linear_divergence`.

    ``labels`` has the leading shape of ``hidden`` and is already aligned with it (for next-token prediction the
    caller shifts: hidden ``[:, :-1]`` with labels ``[:, 1:]``). Positions labelled ``ignore_index`` do not count;
    "mean" is over the others, like ``F.cross_entropy``, except with none at all: 0 with a zero gradient, where
    ``F.cross_entropy`` gives NaN (a NaN would poison a whole accumulated step). Computed in
    fp32 (fp64 stays fp64); the gradient ``softmax - onehot`` is formed per chunk.
    """
    _check_head("student", hidden, weight)
    keep, targets = _kept_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index)
    vocab = weight.shape[0]
    logits = _ChunkLogits(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    def step(h: torch.Tensor, start: int, end: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = logits("student", h, weight)
        loss = _blockwise(_cross_entropy_block, z, targets[start:end].unsqueeze(-1), want_grad=want_grad)
        return loss, z if want_grad else None

    return _apply(_flat_rows(hidden, keep), weight, _chunk_tokens(chunk_size, vocab), step, reduction)
