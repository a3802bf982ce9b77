"""Turning teacher log-probabilities into sparse targets, and writing shards atomically.

The targets are computed in float32 (whatever the teacher's dtype) and stored in the dtypes of ``format``. A shard is
written to a temporary name, flushed with fsync and renamed into place, then its record (checksum, size, sample ids)
is written the same way: a reader or a resumed build never sees a partial shard, and a shard without its record is
simply computed again (the temporary a killed writer left is removed when the file is written again).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as st_save

from distil.cache import format as fmt
from distil.diskspace import BLOCK, DiskFullError, check_space, disk_full_guard
from distil.paths import library_versions

# Told when the disk fills during a build: the finished shards stay, so running it again continues.
RETRY = "run the same build again (finished shards are kept)"
_ROW_CHUNK = 1024  # rows of [rows, V] processed at once: bounds the extra memory of the exact tail computation
# Tails of at least this mass are taken as 1 - sum(top k), whose float32 rounding is at most k * 1.2e-7 absolute:
# relative to such a tail, below float16's 4.9e-4 (the tail's storage) up to k = 80. Smaller tails are summed over the
# tail tokens themselves.
_CHEAP_TAIL_FROM = 2e-2


# ------------------------------------------------------------------------------------------------ target maths
def topk_targets(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, their log-probabilities and the exact log tail mass of rows of normalised log-probs ``[T, V]``.

    The tail is the sum of the probabilities of the tokens outside the top k (not ``1 - sum`` of the top k, which
    loses all precision when the top k hold nearly all the mass); it is ``-inf`` when ``k`` equals the vocabulary.
    """
    k = min(k, logprobs.shape[-1])
    ids, vals, tails = [], [], []
    for rows in logprobs.split(_ROW_CHUNK):
        v, i = rows.topk(k, dim=-1)
        # Probabilities are <= 1: summing exp directly is safe, and faster than logsumexp over a masked copy.
        tails.append(rows.exp().scatter_(-1, i, 0.0).sum(-1).log())
        ids.append(i)
        vals.append(v)
    if not ids:
        empty = logprobs.new_zeros((0, k))
        return empty.long(), empty, logprobs.new_zeros(0)
    return torch.cat(ids), torch.cat(vals), torch.cat(tails)


def topk_targets_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_targets` of ``log_softmax(logits)``, from the (already softened, float32) logits ``[T, V]``
    without forming the log-softmax; ``logits`` is overwritten (with ``exp(logits - max)``).

    The tail is ``log(1 - sum of the top-k probabilities)`` where that keeps float16's precision (a tail of at least
    ``_CHEAP_TAIL_FROM``) and the exact sum over the tail tokens elsewhere. One exp pass instead of two, and no
    ``[T, V]`` log-probabilities: the build's work beside the teacher's forward drops by about a third.
    """
    k = min(k, logits.shape[-1])
    vals, ids = logits.topk(k, dim=-1)
    e = logits.sub_(vals[:, :1]).exp_()
    total = e.sum(-1)
    lp = vals - vals[:, :1] - total.log().unsqueeze(-1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp_max(1.0))
    exact = ~(tail >= math.log(_CHEAP_TAIL_FROM))  # NaN-safe
    if bool(exact.any()):
        rows = exact.nonzero().squeeze(1)
        tail[rows] = (e[rows].scatter_(-1, ids[rows], 0.0).sum(-1) / total[rows]).log()
    return ids, lp, tail


def draw_seed(seed: int, sample_id: int) -> int:
    """A per-sample seed, so that draws do not depend on batching, sharding or resumption."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_targets(
    logprobs: torch.Tensor, num_draws: int, generator: torch.Generator, sampling: str = "multinomial"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_draws`` tokens from each row's distribution; return the distinct tokens.

    Returns ``(row_counts [T], ids [E], counts [E], entropy [T])``: row t's distinct ids are the next
    ``row_counts[t]`` entries of ``ids``, drawn ``counts`` times each. ``counts / num_draws`` has expectation equal to
    the teacher's probability of each token, which makes the sparse cross-entropy unbiased. ``sampling`` is
    ``"systematic"`` or ``"multinomial"`` (see :func:`draw_tokens`).
    """
    probs = logprobs.exp()
    # -inf log-probs (probability 0) are clamped so that they contribute 0, not NaN; faster than special.entr.
    entropy = -(probs * logprobs.clamp_min(torch.finfo(logprobs.dtype).min)).sum(-1)
    return _distinct(draw_tokens(probs, num_draws, generator, sampling)) + (entropy,)


def sample_targets_from_logits(
    logits: torch.Tensor, num_draws: int, generator: torch.Generator, sampling: str = "multinomial"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_targets` of ``log_softmax(logits)``, from the (already softened, float32) logits ``[T, V]``
    without forming the log-softmax; ``logits`` is overwritten (with ``logits - max``). The draws come from the
    unnormalised ``exp(logits - max)`` (the same distribution) and the entropy is ``log Z - sum(e * y) / Z``."""
    y = logits.sub_(logits.amax(-1, keepdim=True))
    e = y.exp()
    total = e.sum(-1)
    # sum(e * y) without a [T, V] temporary; a -inf logit (e = 0) would make it NaN, so then the product is formed.
    ey = torch.linalg.vecdot(e, y) if y.numel() == 0 or bool(y.min() > -math.inf) else (e * y).nansum(-1)
    entropy = total.log() - ey / total
    return _distinct(draw_tokens(e, num_draws, generator, sampling)) + (entropy,)


def draw_tokens(weights: torch.Tensor, num_draws: int, generator: torch.Generator, sampling: str) -> torch.Tensor:
    """``num_draws`` token ids per row ``[T, num_draws]``, sorted, drawn in proportion to ``weights`` ``[T, V]``
    (unnormalised; overwritten by the systematic sampler).

    ``multinomial``: independent draws with replacement. ``systematic``: one uniform offset per row and the points
    ``(u + i) / num_draws`` of the row's cumulative distribution, so that a token of probability p is drawn
    ``floor(n p)`` or ``ceil(n p)`` times and never further from ``n p``: the counts are as unbiased as the
    independent draws' (each point is uniform over its stratum), with much less variance on the likely tokens.
    """
    if weights.shape[0] == 0:
        return torch.zeros(0, num_draws, dtype=torch.long, device=weights.device)
    if sampling == "multinomial":
        return torch.multinomial(weights, num_draws, replacement=True, generator=generator).sort(-1).values
    if sampling != "systematic":
        raise ValueError(f"unknown sampling {sampling!r}")
    # CPU cumsum accumulates float32 in double, so the bins keep the weights' precision.
    cdf = weights.cumsum_(-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    points = (u + torch.arange(num_draws, device=cdf.device, dtype=cdf.dtype)) / num_draws * total
    ids = torch.searchsorted(cdf, points, right=True)
    # A point rounded up to the total would land past the last token of nonzero weight: keep it on that token.
    return torch.minimum(ids, torch.searchsorted(cdf, total))


def _distinct(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_counts, ids, counts) of the sorted draws ``[T, n]``: each row's distinct ids and how often each occurs."""
    if draws.shape[0] == 0:
        z = torch.zeros(0, dtype=torch.long, device=draws.device)
        return z, z, z
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    row_counts = new.sum(-1)
    ids = draws[new]
    starts = torch.nonzero(new.reshape(-1)).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([draws.numel()])])
    return row_counts, ids, ends - starts


# ---------------------------------------------------------------------------------------------- shard contents
@dataclass
class ShardBuffer:
    """Targets of the samples of one shard, gathered sample by sample, then encoded as one safetensors file."""

    mode: str
    vocab_size: int
    num_draws: int | None = None
    layout: str = "sequence"
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def _put(self, name: str, value: np.ndarray) -> None:
        self.parts.setdefault(name, []).append(value)

    def add(self, sample_id: int, keep: np.ndarray, **targets: torch.Tensor) -> None:
        """Add one sample: its kept positions and its targets (float32/int64 tensors, rows = kept positions)."""
        self._put("sample_ids", np.array([sample_id], dtype=np.int64))
        self._put("lengths", np.array([len(keep)], dtype=np.int32))
        self._put("keep", np.asarray(keep, dtype=np.bool_))
        ids_t = fmt.id_dtype(self.vocab_size)
        for name, t in targets.items():
            a = t.detach().cpu().numpy()
            if name in ("ids",):
                a = a.astype(ids_t)
            elif name in ("logprobs", "tail_logmass"):
                a = a.astype(np.float16)
            elif name in ("row_counts", "counts"):
                a = a.astype(fmt.count_dtype(self.num_draws or 1))
            elif name == "entropy":
                a = a.astype(np.float32)
            else:
                raise ValueError(f"unknown target array {name}")
            self._put(name, a)

    @property
    def num_samples(self) -> int:
        return len(self.parts.get("sample_ids", []))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(chunks) for name, chunks in self.parts.items()}


# ------------------------------------------------------------------------------------------------ atomic writes
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` left by writers killed before their rename on this machine. Those of live
    writers (another part of a split build) and of other machines (a shared filesystem) are left alone."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        try:
            writer_host, pid, _ = tmp.name[len(path.name) + len(".tmp-") :].rsplit("-", 2)
            stale = writer_host == host and not _alive(int(pid))
        except ValueError:  # not a name this module makes
            continue
        if stale:
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one, never a part."""
    remove_stale_temporaries(path)  # before the space check: what they held is free again
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    needed = len(data) + BLOCK
    check_space(path, needed, retry=RETRY)
    with disk_full_guard(path, needed, cleanup=tmp, retry=RETRY):  # removes the partial file on any failure
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def write_shard(root: Path, index: int, buffer: ShardBuffer, fingerprint: str) -> fmt.ShardRecord:
    """Encode, checksum and atomically write shard ``index`` and then its record; return the record."""
    arrays = buffer.arrays()
    # One metadata key: safetensors writes several in a random order, and shards must be byte-reproducible.
    data = st_save(arrays, metadata={"distil": f"{fmt.FORMAT} v{fmt.VERSION} {buffer.mode}"})
    name = fmt.shard_file(index)
    atomic_write(root / name, data)
    lengths = arrays["lengths"]
    record = fmt.ShardRecord(
        index=index,
        file=name,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        num_samples=len(arrays["sample_ids"]),
        num_positions=int(arrays["keep"].sum()),
        num_entries=int(arrays["ids"].size if "ids" in arrays else arrays["logprobs"].size),
        vocab_size=buffer.vocab_size,
        layout=buffer.layout,  # type: ignore[arg-type]
        max_length=int(lengths.max()) if len(lengths) else 0,
        fingerprint=fingerprint,
        sample_ids=fmt.ids_to_ranges(arrays["sample_ids"]),
        versions=library_versions(),
    )
    try:
        atomic_write(root / fmt.shard_record_file(index), fmt.dump_model(record))
    except DiskFullError:
        (root / name).unlink(missing_ok=True)  # without its record it would be computed again: free its space now
        raise
    return record
