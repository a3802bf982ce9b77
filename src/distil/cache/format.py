"""The on-disk format of a teacher cache: file names, the manifest schema, dtypes, checksums and fingerprints.

A cache is a directory::

    build.json                     settings of the build (written first; every part and resume must agree)
    shard-000000.safetensors       targets of samples [0, shard_size) of the stream, keyed by sample id
    shard-000000.json              the shard's record: sha256, size, sample ids, counts (written after the shard)
    ...
    stream.json                    totals of the whole sample stream (written by any part that saw all of it)
    manifest.json                  the complete manifest; present only when every shard is (the completion marker)

Shard ``j`` always holds the samples at stream positions ``[j * shard_size, (j + 1) * shard_size)``, batched the same
way, whichever process computed it: a build split into ``n`` parts writes the same files as a single process.

Every shard holds ``sample_ids`` (int64 ``[S]``), ``lengths`` (int32 ``[S]``, input positions per sample) and
``keep`` (bool ``[sum(lengths)]``, the positions that carry a target; targets are stored for kept positions only),
then, per mode:

- ``topk``: ``ids`` ``[T, k]`` and ``logprobs`` float16 ``[T, k]`` (the teacher's k most likely tokens and their
  log-probabilities at the build temperature) and ``tail_logmass`` float16 ``[T]`` (log of the probability of all
  other tokens, computed exactly from the full distribution; ``-inf`` when k equals the vocabulary).
- ``sample``: ``num_draws`` tokens drawn from the teacher's distribution at the build temperature (Anshumann et al.,
  ACL 2025, "Sparse Logit Sampling"), by the manifest's ``sampling``: ``systematic`` (one uniform offset and evenly
  spaced points on each position's cumulative distribution) or ``multinomial`` (independent draws with replacement;
  caches that do not record a sampling were built this way); per position the distinct tokens: ``row_counts`` ``[T]``,
  ``ids`` ``[E]`` and ``counts`` ``[E]`` (how often each was drawn; weight = count / num_draws makes the sparse
  cross-entropy an unbiased estimate of the dense one), and ``entropy`` float32 ``[T]`` (the teacher's exact entropy,
  so that the KL, not only the cross-entropy, is estimated without bias).
- ``full``: ``logprobs`` float16 ``[T, V]`` (classifiers with few classes).

Ids use the smallest integer type that holds the vocabulary (uint8, uint16 up to 65,536, else int32); counts the
smallest that holds ``num_draws``. Safetensors stores U8/U16 natively, so no workaround is needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distil.errors import DistilError

FORMAT = "distil-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
STREAM = "stream.json"
VALUE_DTYPE = "float16"
MODES = ("topk", "sample", "full")
Sampling = Literal["systematic", "multinomial"]

# safetensors dtype names <-> numpy
ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}


def shard_file(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_record_file(index: int) -> str:
    return f"shard-{index:06d}.json"


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest integer dtype that holds token ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    if vocab_size <= 2**31:
        return np.dtype(np.int32)
    raise DistilError(f"vocabulary of {vocab_size} entries is too large for the cache format (at most 2**31)")


def count_dtype(max_count: int) -> np.dtype:
    return np.dtype(np.uint8) if max_count <= 255 else np.dtype(np.uint16)


def storage_dtypes(mode: str, vocab_size: int, num_draws: int | None) -> dict[str, str]:
    """The dtype of every array a shard of this mode holds."""
    common = {"sample_ids": "int64", "lengths": "int32", "keep": "bool"}
    if mode == "topk":
        extra = {"ids": str(id_dtype(vocab_size)), "logprobs": VALUE_DTYPE, "tail_logmass": VALUE_DTYPE}
    elif mode == "sample":
        counts = str(count_dtype(num_draws or 1))
        extra = {"row_counts": counts, "ids": str(id_dtype(vocab_size)), "counts": counts, "entropy": "float32"}
    else:
        extra = {"logprobs": VALUE_DTYPE}
    return dict(sorted({**common, **extra}.items()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Sampled(_Strict):
    """Settings or manifests with a ``sampling``: recorded for sampled caches only."""

    @model_validator(mode="before")
    @classmethod
    def _default_sampling(cls, data: Any) -> Any:
        # Sampled caches from before the field was recorded drew independently.
        if isinstance(data, dict) and data.get("mode") == "sample" and data.get("sampling") is None:
            return {**data, "sampling": "multinomial"}
        return data

    @model_validator(mode="after")
    def _sampling_only_when_sampled(self) -> Any:
        if self.mode != "sample" and self.sampling is not None:  # type: ignore[attr-defined]
            raise ValueError(f"sampling is for mode 'sample', not {self.mode!r}")  # type: ignore[attr-defined]
        return self


class ManifestFields(_Strict):
    """What the caller states about the teacher and data; compared against the student's run by ``check_compatible``."""

    teacher: str | None = None
    teacher_hash: str | None = None
    tokenizer_hash: str | None = None
    dataset_fingerprint: str | None = None
    seq_len: int | None = Field(default=None, gt=0)
    notes: dict[str, str] = Field(default_factory=dict)


class BuildSettings(_Sampled):
    """Settings that change the stored targets; a resumed build or another part must use the same ones."""

    format: Literal["distil-teacher-cache"] = FORMAT
    version: int = VERSION
    mode: Literal["topk", "sample", "full"]
    k: int | None = Field(default=None, gt=0)
    num_draws: int | None = Field(default=None, gt=0, le=65535)
    sampling: Sampling | None = None
    temperature: float = Field(gt=0)
    seed: int = 0
    shard_size: int = Field(gt=0)
    fields: ManifestFields = Field(default_factory=ManifestFields)


class ShardRecord(_Strict):
    index: int = Field(ge=0)
    file: str
    sha256: str
    bytes: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    num_positions: int = Field(ge=0)
    num_entries: int = Field(ge=0)
    vocab_size: int = Field(gt=0)
    layout: Literal["sequence", "single"]
    max_length: int = Field(ge=0)
    fingerprint: str  # of the shard's samples: a resumed build with other samples is caught at the first shard
    # Sample ids covered, as sorted half-open ranges [start, stop).
    sample_ids: list[tuple[int, int]]
    # Library versions of the process that computed it ({} in caches built before they were recorded).
    versions: dict[str, str] = Field(default_factory=dict)


class StreamInfo(_Strict):
    """Totals of the whole sample stream, known to any part once it has iterated over all samples."""

    num_samples: int = Field(ge=0)
    num_shards: int = Field(ge=0)
    num_positions: int = Field(ge=0)
    dataset_fingerprint: str


class CacheManifest(_Sampled):
    format: Literal["distil-teacher-cache"] = FORMAT
    version: int = VERSION
    mode: Literal["topk", "sample", "full"]
    k: int | None = None
    num_draws: int | None = None
    sampling: Sampling | None = None
    temperature: float
    seed: int
    layout: Literal["sequence", "single"]
    vocab_size: int
    seq_len: int | None
    teacher: str | None
    teacher_hash: str | None
    tokenizer_hash: str | None
    dataset_fingerprint: str
    notes: dict[str, str]
    dtypes: dict[str, str]
    shard_size: int
    num_samples: int
    num_positions: int
    shards: list[ShardRecord]


def read_model(path: Path, model: type[_Strict]) -> Any:
    raw = path.read_bytes()
    try:
        version = json.loads(raw).get("version", VERSION)
    except (ValueError, AttributeError):
        version = VERSION  # not JSON or not an object: the validation below names the problem
    if version != VERSION:
        raise DistilError(f"{path} is a teacher cache of format version {version}, this distil reads version "
                          f"{VERSION}: rebuild it with `distil cache build` (or read it with the distil that built it)")
    try:
        return model.model_validate_json(raw)
    except ValueError as e:
        first = str(e).splitlines()[0:3]
        raise DistilError(f"{path} is not a valid {model.__name__} ({' '.join(first)}); the cache is damaged: "
                          "rebuild it")


def dump_model(model: _Strict) -> bytes:
    return (json.dumps(model.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------------------------------- sample id ranges
def ids_to_ranges(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted half-open ranges covering exactly the given (distinct) ids: [3,4,5,9] -> [(3,6),(9,10)]."""
    if len(ids) == 0:
        return []
    s = np.sort(np.asarray(ids, dtype=np.int64))
    breaks = np.flatnonzero(np.diff(s) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(s)]])
    return [(int(s[a]), int(s[b - 1]) + 1) for a, b in zip(starts, stops)]


def ranges_to_ids(ranges: Iterable[tuple[int, int]]) -> np.ndarray:
    parts = [np.arange(a, b, dtype=np.int64) for a, b in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# -------------------------------------------------------------------------------------- checksums, fingerprints
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of device)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens of a HF tokenizer."""
    vocab = tokenizer.get_vocab()
    special = getattr(tokenizer, "all_special_tokens", []) or []
    payload = json.dumps({"vocab": sorted(vocab.items()), "special": sorted(special)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def sample_digest(sample: Mapping[str, Any]) -> bytes:
    """Digest of one sample: its id and input_ids (or, for samples without input_ids, every tensor or number field)."""
    h = hashlib.sha256(f"id={int(sample['id'])}\n".encode())
    keys = ["input_ids"] if "input_ids" in sample else sorted(k for k in sample if k != "id")
    for key in keys:
        value = sample[key]
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.digest()


class DatasetFingerprint:
    """Order-independent fingerprint of a set of samples: the count and the sum (mod 2**256) of their digests.

    Independent of order so that a shuffled dataset, or the same samples seen by several processes, agree.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total = 0

    def update(self, sample: Mapping[str, Any]) -> None:
        self.add(sample_digest(sample))

    def add(self, digest: bytes) -> None:
        self.count += 1
        self.total = (self.total + int.from_bytes(digest, "big")) % (1 << 256)

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:064x}".encode()).hexdigest()


def dataset_fingerprint(samples: Iterable[Mapping[str, Any]]) -> str:
    fp = DatasetFingerprint()
    for sample in samples:
        fp.update(sample)
    return fp.hexdigest()
