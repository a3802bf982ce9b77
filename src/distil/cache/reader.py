"""Reading a teacher cache: memory-mapped shards, targets for a batch of sample ids, compatibility checks.

Shards are safetensors files opened with ``numpy.memmap`` over the byte ranges their header names (zero copy; the
format benchmark in ``benchmarks/cache.md`` found this the fastest way to read random sample ids here). Only complete
caches (with ``manifest.json``) are read. Each shard's size is checked when the cache is opened and its sha256 the
first time it is read (``verify="lazy"``), or all at open (``verify="full"``); a damaged shard is named in the error.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil.cache import format as fmt
from distil.errors import DistilError
from distil.paths import release_mismatch

_VERIFY = ("lazy", "full", "size")


class _Shard:
    """The arrays of one shard as memory maps, plus per-sample offsets into them."""

    def __init__(self, path: Path, dtypes: dict[str, str]):
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
            self.arrays: dict[str, np.ndarray] = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if end > len(raw):
                    raise ValueError(f"tensor {name} runs past the end of the file")
                self.arrays[name] = raw[begin:end].view(fmt.ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise DistilError(f"shard {path.name} of the teacher cache {path.parent} cannot be read ({e}); "
                              f"delete it and its .json record and resume the build") from None
        found = {name: str(a.dtype) for name, a in sorted(self.arrays.items())}
        if found != dtypes:
            raise DistilError(f"shard {path.name} of {path.parent} holds {found}, the manifest says {dtypes}; rebuild")
        a = self.arrays
        self.pos_off = np.concatenate([[0], np.cumsum(a["lengths"], dtype=np.int64)])
        kept = np.concatenate([[0], np.cumsum(a["keep"], dtype=np.int64)])
        self.tok_off = kept[self.pos_off]
        if "row_counts" in a:
            self.ent_off = np.concatenate([[0], np.cumsum(a["row_counts"], dtype=np.int64)])[self.tok_off]


def _warn_other_release(root: Path, manifest: fmt.CacheManifest) -> None:
    """One warning when shards were computed under another torch or transformers release (a cache copied from
    another machine): the targets load exactly, but this machine's teacher may compute slightly different ones."""
    for record in manifest.shards:
        release = release_mismatch(record.versions)
        if release:
            warnings.warn(f"the teacher cache {root} was built with {release}; using it, but the teacher's targets "
                          "may differ from what it computes here; rebuild the cache on this machine if results look "
                          "off", stacklevel=3)
            return


class TeacherCache:
    """A complete teacher cache on disk. ``targets(ids)`` returns padded target tensors for a batch of samples."""

    def __init__(self, path: str | Path, *, verify: str = "lazy"):
        if verify not in _VERIFY:
            raise DistilError(f"verify must be one of {', '.join(_VERIFY)}, got {verify!r}")
        self.root = Path(path)
        self.verify_mode = verify
        manifest_path = self.root / fmt.MANIFEST
        if not manifest_path.exists():
            if (self.root / fmt.BUILD).exists():
                raise DistilError(f"the teacher cache at {self.root} is incomplete (no {fmt.MANIFEST}); resume the "
                                  "build, or run finalize once all parts are done (distil cache info shows coverage)")
            raise DistilError(f"{self.root} is not a teacher cache (no {fmt.MANIFEST}); build one first")
        self.manifest: fmt.CacheManifest = fmt.read_model(manifest_path, fmt.CacheManifest)
        _warn_other_release(self.root, self.manifest)
        for record in self.manifest.shards:
            file = self.root / record.file
            if not file.exists():
                raise DistilError(f"shard {record.file} of the teacher cache {self.root} is missing; resume the build")
            size = file.stat().st_size
            if size != record.bytes:
                raise DistilError(f"shard {record.file} of the teacher cache {self.root} is damaged (truncated or "
                                  f"changed: {size} bytes, expected {record.bytes}); delete it and its .json record "
                                  "and resume the build")
        self._checked: set[int] = set()
        if verify == "full":
            self.verify()
        ids, where_shard = [], []
        for s, record in enumerate(self.manifest.shards):
            shard_ids = fmt.ranges_to_ids(record.sample_ids)
            ids.append(shard_ids)
            where_shard.append(np.full(len(shard_ids), s, dtype=np.int32))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._shard_of = (np.concatenate(where_shard) if ids else np.zeros(0, dtype=np.int32))[order]
        self._shards: dict[int, _Shard] = {}
        self._rows: dict[int, dict[int, int]] = {}

    # ------------------------------------------------------------------------------------------- properties
    mode = property(lambda self: self.manifest.mode)
    temperature = property(lambda self: self.manifest.temperature)
    vocab_size = property(lambda self: self.manifest.vocab_size)
    seq_len = property(lambda self: self.manifest.seq_len)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, sample_id: object) -> bool:
        i = np.searchsorted(self._ids, sample_id)
        return bool(i < len(self._ids) and self._ids[i] == sample_id)

    def sample_ids(self) -> np.ndarray:
        return self._ids.copy()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers: send the index, not the memory maps (numpy would pickle their contents).
        state = self.__dict__.copy()
        state["_shards"], state["_rows"] = {}, {}
        return state

    def close(self) -> None:
        self._shards.clear()
        self._rows.clear()

    # ------------------------------------------------------------------------------------------- checks
    def _check_shard(self, s: int) -> None:
        record = self.manifest.shards[s]
        digest = fmt.sha256_file(self.root / record.file)
        if digest != record.sha256:
            raise DistilError(f"shard {record.file} of the teacher cache {self.root} is damaged (sha256 "
                              f"{digest[:16]}..., expected {record.sha256[:16]}...); delete it and its .json record "
                              "and resume the build")
        self._checked.add(s)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads the whole cache)."""
        for s in range(len(self.manifest.shards)):
            if s not in self._checked:
                self._check_shard(s)

    def check_compatible(self, **expected: Any) -> None:
        """Refuse a run whose settings differ from the cache's: pass any of ``teacher_hash``, ``tokenizer_hash``,
        ``dataset_fingerprint``, ``seq_len``, ``temperature``, ``vocab_size``, ``mode``, ``k``, ``num_draws``,
        ``sampling`` (None = not checked). A run whose cache settings differ is told the ones that read it as it is.

        A field the cache did not record cannot be confirmed, and counts as a mismatch.
        """
        known = ("teacher_hash", "tokenizer_hash", "dataset_fingerprint", "seq_len", "temperature", "vocab_size",
                 "mode", "k", "num_draws", "sampling")
        problems, settings = [], []
        for field, want in expected.items():
            if field not in known:
                raise DistilError(f"check_compatible got unknown field {field!r}; known: {', '.join(known)}")
            if want is None:
                continue
            have = getattr(self.manifest, field)
            if field == "temperature":
                same = have is not None and math.isclose(have, want, rel_tol=1e-9)
            else:
                same = have == want
            if not same:
                shown = "(not recorded)" if have is None else repr(have)
                problems.append(f"{field}: the cache has {shown}, this run has {want!r}")
                if field in ("mode", "k", "num_draws", "sampling") and have is not None:
                    settings.append(f"teacher.cache.{field}={have}")
        if problems:
            fix = f" (to read it as it is: {' '.join(settings)})" if len(settings) == len(problems) else ""
            raise DistilError(f"the teacher cache at {self.root} does not match this run: {'; '.join(problems)}; "
                              f"rebuild the cache for this run (distil cache build) or fix the run's settings{fix}")

    # ------------------------------------------------------------------------------------------- reading
    def _open(self, s: int) -> _Shard:
        shard = self._shards.get(s)
        if shard is None:
            if self.verify_mode == "lazy" and s not in self._checked:
                self._check_shard(s)
            shard = _Shard(self.root / self.manifest.shards[s].file, self.manifest.dtypes)
            self._rows[s] = {int(i): r for r, i in enumerate(shard.arrays["sample_ids"])}
            self._shards[s] = shard
        return shard

    def _locate(self, sample_ids: Sequence[int]) -> list[tuple[_Shard, int]]:
        q = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._ids, q).clip(0, max(len(self._ids) - 1, 0))
        out = []
        for sid, p in zip(q.tolist(), pos.tolist()):
            if len(self._ids) == 0 or self._ids[p] != sid:
                raise DistilError(f"sample id {sid} is not in the teacher cache at {self.root}; the cache was built "
                                  "for other samples (check dataset_fingerprint)")
            s = int(self._shard_of[p])
            shard = self._open(s)
            out.append((shard, self._rows[s][sid]))
        return out

    def targets(self, sample_ids: Sequence[int] | torch.Tensor, seq_len: int | None = None, *,
                normalize: bool = True) -> dict[str, torch.Tensor]:
        """Padded targets for a batch, aligned with the logits positions (right padding).

        Keys: ``mask`` (bool ``[B, L]``, positions with a target) and, per mode, ``ids`` (int64 ``[B, L, K]``),
        ``logprobs`` (float32; ``-inf`` in padding) and ``tail_logmass`` (``[B, L]``) for ``topk``; ``ids``,
        ``weights`` (count / num_draws, 0 in padding) and ``entropy`` for ``sample``; ``logprobs`` ``[B, L, V]`` for
        ``full``; ``temperature`` (0-d, the build temperature). Classifier caches (one row per sample) drop the ``L``
        dimension. ``normalize`` removes the float16 rounding so that top-k plus tail (or the full row) sums to exactly
        1 in float32.
        """
        if isinstance(sample_ids, torch.Tensor):
            sample_ids = sample_ids.tolist()
        located = self._locate(sample_ids)
        spans = [(sh, sh.pos_off[r], sh.pos_off[r + 1], sh.tok_off[r], sh.tok_off[r + 1]) for sh, r in located]
        single = self.manifest.layout == "single"
        longest = max((p1 - p0 for _, p0, p1, _, _ in spans), default=0)
        width = 1 if single else (longest if seq_len is None else seq_len)
        if longest > width:
            raise DistilError(f"a sample in this batch has {longest} positions, more than seq_len={width}")
        batch, mode = len(spans), self.manifest.mode
        mask = np.zeros((batch, width), dtype=np.bool_)
        rows_of: list[np.ndarray] = []
        for b, (sh, p0, p1, _, _) in enumerate(spans):
            rows = np.flatnonzero(sh.arrays["keep"][p0:p1])
            mask[b, rows] = True
            rows_of.append(rows)
        out: dict[str, np.ndarray] = {}
        if mode == "topk":
            k = self.manifest.k if self.manifest.k is not None else 1
            k = min(k, self.manifest.vocab_size)
            out["ids"] = np.zeros((batch, width, k), dtype=np.int64)
            out["logprobs"] = np.full((batch, width, k), -np.inf, dtype=np.float32)
            out["tail_logmass"] = np.full((batch, width), -np.inf, dtype=np.float32)
            for b, (sh, _, _, t0, t1) in enumerate(spans):
                out["ids"][b, rows_of[b]] = sh.arrays["ids"][t0:t1]
                out["logprobs"][b, rows_of[b]] = sh.arrays["logprobs"][t0:t1]
                out["tail_logmass"][b, rows_of[b]] = sh.arrays["tail_logmass"][t0:t1]
        elif mode == "sample":
            widest = max((int(sh.arrays["row_counts"][t0:t1].max(initial=0)) for sh, _, _, t0, t1 in spans), default=0)
            out["ids"] = np.zeros((batch, width, max(widest, 1)), dtype=np.int64)
            out["weights"] = np.zeros((batch, width, max(widest, 1)), dtype=np.float32)
            out["entropy"] = np.zeros((batch, width), dtype=np.float32)
            draws = float(self.manifest.num_draws or 1)
            for b, ((sh, _, _, t0, t1), (_, r)) in enumerate(zip(spans, located)):
                counts = sh.arrays["row_counts"][t0:t1].astype(np.int64)
                e0, e1 = sh.ent_off[r], sh.ent_off[r + 1]
                row = np.repeat(rows_of[b], counts)
                col = np.arange(e1 - e0) - np.repeat(np.cumsum(counts) - counts, counts)
                out["ids"][b, row, col] = sh.arrays["ids"][e0:e1]
                out["weights"][b, row, col] = sh.arrays["counts"][e0:e1] / draws
                out["entropy"][b, rows_of[b]] = sh.arrays["entropy"][t0:t1]
        else:
            out["logprobs"] = np.full((batch, width, self.manifest.vocab_size), -np.inf, dtype=np.float32)
            for b, (sh, _, _, t0, t1) in enumerate(spans):
                out["logprobs"][b, rows_of[b]] = sh.arrays["logprobs"][t0:t1]
        result = {name: torch.from_numpy(a) for name, a in out.items()}
        result["mask"] = torch.from_numpy(mask)
        if normalize and mode in ("topk", "full"):
            _renormalize(result, mode)
        if single:
            result = {name: t.squeeze(1) for name, t in result.items()}
        # The build temperature travels with the targets, so that cached_divergence can refuse another one.
        result["temperature"] = torch.tensor(self.manifest.temperature, dtype=torch.float32)
        return result


def _renormalize(t: dict[str, torch.Tensor], mode: str) -> None:
    keep = t["mask"]
    if mode == "topk":
        both = torch.cat([t["logprobs"], t["tail_logmass"].unsqueeze(-1)], dim=-1)
        lse = torch.where(keep, both.logsumexp(-1), 0.0)
        t["logprobs"] -= lse.unsqueeze(-1)
        t["tail_logmass"] -= lse
    else:
        lse = torch.where(keep, t["logprobs"].logsumexp(-1), 0.0)
        t["logprobs"] -= lse.unsqueeze(-1)
