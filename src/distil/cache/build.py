"""Run a teacher once over a stream of samples and store its sparse targets: resumable, splittable, atomic.

``build_cache`` walks the whole sample stream in order. Stream position ``g`` belongs to shard ``g // shard_size``;
part ``i`` of ``n`` computes the shards whose index is ``i`` modulo ``n`` and only reads (to fingerprint and count)
the others. A shard is batched on its own, so its bytes do not depend on how many parts there are or on where an
earlier run stopped. Shards already recorded on disk are skipped: resuming is running the same call again. When
every shard is present the manifest is written (``finalize_cache``); with several parts or ranks, whichever finishes
last does it, or call ``finalize_cache`` after a barrier.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distil.cache import format as fmt
from distil.cache.writer import (
    ShardBuffer, atomic_write, draw_seed, sample_targets_from_logits, topk_targets_from_logits, write_shard,
)
from distil.errors import DistilError

Sample = Mapping[str, Any]
TeacherFn = Callable[[dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class BuildResult:
    path: Path
    complete: bool  # the manifest is written (every shard of every part is present)
    num_shards: int  # shards in the whole stream
    shards_written: int  # by this call
    shards_skipped: int  # already present (resumed), or belonging to other parts
    positions_written: int  # by this call
    seconds: float
    manifest: fmt.CacheManifest | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------- samples, batches
def _normalise(sample: Sample, seq_len: int | None) -> dict[str, Any]:
    if "id" not in sample:
        raise DistilError(f"every sample needs an integer 'id' (the cache is keyed by it); got keys {sorted(sample)}")
    s = dict(sample)
    try:
        s["id"] = int(sample["id"])
    except (TypeError, ValueError):
        raise DistilError(f"sample id must be an integer, got {sample['id']!r}") from None
    for key in ("input_ids", "labels", "mask"):
        if key in s:
            s[key] = torch.as_tensor(s[key])
    if "input_ids" in s:
        ids = s["input_ids"]
        if ids.dim() != 1 or ids.dtype.is_floating_point:
            raise DistilError(f"sample {s['id']}: input_ids must be a 1-D integer tensor, got {ids.dtype} "
                              f"{tuple(ids.shape)}")
        if seq_len is not None and len(ids) > seq_len:
            raise DistilError(
                f"sample {s['id']} has {len(ids)} tokens, more than seq_len={seq_len} stated for the cache; "
                "truncate the samples or state the real seq_len"
            )
    return s


def keep_positions(sample: Sample) -> np.ndarray:
    """Logit positions that get a target: ``mask`` (bool, per position) if given, else positions whose NEXT label is
    not -100 (Hugging Face's shifted labels; the last position then has none), else every position."""
    if "input_ids" not in sample:
        return np.ones(1, dtype=np.bool_)  # a classifier sample: one row of logits
    n = len(sample["input_ids"])
    if "mask" in sample:
        keep = torch.as_tensor(sample["mask"]).bool().cpu().numpy()
    elif "labels" in sample:
        labels = torch.as_tensor(sample["labels"]).cpu().numpy()
        keep = np.zeros(n, dtype=np.bool_)
        keep[:-1] = labels[1:] != -100
    else:
        keep = np.ones(n, dtype=np.bool_)
    if keep.shape != (n,):
        raise DistilError(f"sample {sample['id']}: mask/labels have shape {keep.shape}, input_ids ({n},)")
    return keep


def default_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; right-pad 1-D tensors of unequal length (input_ids with 0, labels with -100, masks with False)
    and add ``attention_mask`` for ``input_ids``. Other values are passed as lists."""
    batch: dict[str, Any] = {"id": torch.tensor([s["id"] for s in samples], dtype=torch.long)}
    pads = {"labels": -100, "mask": False}
    for key in samples[0]:
        if key == "id":
            continue
        values = [s[key] for s in samples]
        if not all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = values
        elif len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif all(v.dim() == 1 for v in values):
            width = max(len(v) for v in values)
            out = values[0].new_full((len(values), width), pads.get(key, 0))
            for row, v in enumerate(values):
                out[row, : len(v)] = v
            batch[key] = out
        else:
            shapes = [tuple(v.shape) for v in values]
            raise DistilError(f"cannot batch field {key!r} of shapes {shapes}; pass collate_fn")
    if "input_ids" in batch and isinstance(batch["input_ids"], torch.Tensor):
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
    return batch


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# ------------------------------------------------------------------------------------------------ settings
def _settings(mode: str, k: int, num_draws: int, sampling: str, temperature: float, seed: int, shard_size: int,
              manifest_fields: Mapping[str, Any] | None) -> fmt.BuildSettings:
    if mode not in fmt.MODES:
        raise DistilError(f"cache mode must be one of {', '.join(fmt.MODES)}, got {mode!r}")
    try:
        fields = fmt.ManifestFields(**dict(manifest_fields or {}))
        return fmt.BuildSettings(
            mode=mode, k=k if mode == "topk" else None, num_draws=num_draws if mode == "sample" else None,
            sampling=sampling if mode == "sample" else None, temperature=temperature, seed=seed, shard_size=shard_size, fields=fields,
        )
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise DistilError(f"invalid cache settings ({problems}); fix the cache settings of the recipe") from None


def _claim_settings(root: Path, settings: fmt.BuildSettings) -> None:
    path = root / fmt.BUILD
    if not path.exists():
        atomic_write(path, fmt.dump_model(settings))
        return
    found = fmt.read_model(path, fmt.BuildSettings)
    if found != settings:
        old, new = found.model_dump(), settings.model_dump()
        diff = ", ".join(f"{key}: cache has {old[key]!r}, this build asks {new[key]!r}"
                         for key in old if old[key] != new[key])
        raise DistilError(f"the cache at {root} was started with other settings ({diff}); use the same settings to "
                          "resume it, or a new path")


def _shard_done(root: Path, index: int, fingerprint: str | None = None) -> bool:
    """Whether shard ``index`` is on disk with its record; with ``fingerprint``, refuse one built from other samples."""
    record_path = root / fmt.shard_record_file(index)
    if not record_path.exists():
        return False
    try:
        record = fmt.read_model(record_path, fmt.ShardRecord)
    except DistilError:
        return False
    shard = root / record.file
    if not (shard.exists() and shard.stat().st_size == record.bytes):
        return False
    if fingerprint is not None and fingerprint != record.fingerprint:
        raise DistilError(f"shard {record.file} of the cache at {root} was built from other samples than the ones "
                          "at its place in this stream; use the same samples in the same order to resume, "
                          "or a new path")
    return True


# ------------------------------------------------------------------------------------------------ the shard
def _teacher_rows(logits: torch.Tensor, row: int, sample: dict[str, Any], keep: np.ndarray, temperature: float
                  ) -> torch.Tensor:
    if "input_ids" in sample:
        length = len(sample["input_ids"])
        rows = logits[row, :length]
        if not keep.all():  # a copy of [positions, V]: only when some positions are dropped
            rows = rows[torch.from_numpy(keep).to(logits.device)]
    else:
        rows = logits[row : row + 1]
    rows = rows.float()
    return rows if temperature == 1.0 else rows / temperature


def _compute_shard(samples: list[dict[str, Any]], keeps: list[np.ndarray], fn: TeacherFn, collate: Callable,
                   settings: fmt.BuildSettings, batch_size: int, on_batch: Callable[[int], None]) -> ShardBuffer:
    buffer: ShardBuffer | None = None
    layout = "sequence" if "input_ids" in samples[0] else "single"
    for start in range(0, len(samples), batch_size):
        group, group_keeps = samples[start : start + batch_size], keeps[start : start + batch_size]
        batch = collate(group)
        with torch.inference_mode():
            logits = fn(batch)
        want = 3 if layout == "sequence" else 2
        if not isinstance(logits, torch.Tensor) or logits.dim() != want or logits.shape[0] != len(group):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise DistilError(f"the teacher function returned {shape}; expected [batch={len(group)}, "
                              f"{'positions, ' if want == 3 else ''}vocab] logits")
        if layout == "sequence" and logits.shape[1] < max(len(s["input_ids"]) for s in group):
            raise DistilError(f"the teacher returned logits for {logits.shape[1]} positions, fewer than the inputs")
        vocab = logits.shape[-1]
        if buffer is None:
            buffer = ShardBuffer(settings.mode, vocab, settings.num_draws, layout)
        elif vocab != buffer.vocab_size:
            raise DistilError(f"the teacher's vocabulary changed from {buffer.vocab_size} to {vocab} between batches")
        with torch.inference_mode():  # in-place work on the (inference-mode) logits is allowed here
            for row, (sample, keep) in enumerate(zip(group, group_keeps)):
                _add_targets(buffer, logits, row, sample, keep, settings)
        on_batch(int(sum(k.sum() for k in group_keeps)))
    assert buffer is not None
    return buffer


def _add_targets(buffer: ShardBuffer, logits: torch.Tensor, row: int, sample: dict[str, Any], keep: np.ndarray,
                 settings: fmt.BuildSettings) -> None:
    """One sample's targets into the shard buffer."""
    # The softened logits of the sample's kept positions: a view of `logits` where no copy was needed, which the
    # top-k targets overwrite (each sample's rows are read once).
    z = _teacher_rows(logits, row, sample, keep, settings.temperature)
    if settings.mode == "topk":
        ids, vals, tail = topk_targets_from_logits(z, settings.k or 1)
        buffer.add(sample["id"], keep, ids=ids, logprobs=vals, tail_logmass=tail)
    elif settings.mode == "sample":
        gen = torch.Generator(device=z.device).manual_seed(draw_seed(settings.seed, sample["id"]))
        row_counts, ids, counts, entropy = sample_targets_from_logits(
            z, settings.num_draws or 1, gen, settings.sampling or "multinomial")
        buffer.add(sample["id"], keep, row_counts=row_counts, ids=ids, counts=counts, entropy=entropy)
    else:
        buffer.add(sample["id"], keep, logprobs=F.log_softmax(z, dim=-1))


# ------------------------------------------------------------------------------------------------ the loop
def build_cache(
    path: str | Path,
    samples: Iterable[Sample],
    teacher_logits_fn: TeacherFn,
    *,
    mode: str = "topk",
    k: int = 64,
    num_draws: int = 64,
    sampling: str = "multinomial",
    temperature: float = 1.0,
    manifest_fields: Mapping[str, Any] | None = None,
    shard_size: int = 1024,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    seed: int = 0,
    progress: bool = True,
    total: int | None = None,
) -> BuildResult:
    """Run ``teacher_logits_fn`` over ``samples`` once and store sparse targets under ``path`` (see module doc).

    ``teacher_logits_fn(batch)`` gets the collated batch (``id``, ``input_ids``, ``attention_mask``, ...; right
    padded) and returns logits ``[B, L, V]`` (token models) or ``[B, V]`` (classifiers). ``shard=(i, n)`` computes
    part ``i`` of ``n``. ``total`` (samples) sizes the progress bar when ``samples`` has no ``len``.
    """
    part, parts = shard
    if not (parts >= 1 and 0 <= part < parts):
        raise DistilError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if batch_size < 1:
        raise DistilError(f"batch_size must be >= 1, got {batch_size}")
    settings = _settings(mode, k, num_draws, sampling, temperature, seed, shard_size, manifest_fields)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _claim_settings(root, settings)
    collate = collate_fn or default_collate
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]

    fingerprint = fmt.DatasetFingerprint()
    num_samples = num_positions = written = skipped = positions_written = 0
    num_shards = 0
    started = time.perf_counter()
    with _Progress(progress, total, part, parts) as bar:
        for index, chunk in enumerate(_chunks(samples, shard_size)):
            num_shards = index + 1
            chunk = [_normalise(s, settings.fields.seq_len) for s in chunk]
            keeps = [keep_positions(s) for s in chunk]
            shard_fp = fmt.DatasetFingerprint()
            for s in chunk:
                digest = fmt.sample_digest(s)
                fingerprint.add(digest)
                shard_fp.add(digest)
            num_samples += len(chunk)
            num_positions += int(sum(k.sum() for k in keeps))
            if _shard_done(root, index, shard_fp.hexdigest()) or index % parts != part:
                skipped += 1
                bar.skip(len(chunk))
                continue
            buffer = _compute_shard(chunk, keeps, teacher_logits_fn, collate, settings, batch_size, bar.positions)
            positions_written += write_shard(root, index, buffer, shard_fp.hexdigest()).num_positions
            written += 1
            bar.samples(len(chunk))

    stream = fmt.StreamInfo(num_samples=num_samples, num_shards=num_shards, num_positions=num_positions,
                            dataset_fingerprint=fingerprint.hexdigest())
    _record_stream(root, stream, settings)
    manifest = None
    if all(_shard_done(root, i) for i in range(num_shards)):
        manifest = finalize_cache(root)
    return BuildResult(root, manifest is not None, num_shards, written, skipped, positions_written,
                       time.perf_counter() - started, manifest)


def _record_stream(root: Path, stream: fmt.StreamInfo, settings: fmt.BuildSettings) -> None:
    stated = settings.fields.dataset_fingerprint
    if stated is not None and stated != stream.dataset_fingerprint:
        raise DistilError(f"dataset_fingerprint: stated {stated}, but the samples give {stream.dataset_fingerprint}; "
                          "state the fingerprint of these samples (distil.cache.dataset_fingerprint) or leave it out")
    path = root / fmt.STREAM
    if path.exists():
        found = fmt.read_model(path, fmt.StreamInfo)
        if found != stream:
            raise DistilError(f"the cache at {root} was built from other samples (it holds {found.num_samples} "
                              f"samples, fingerprint {found.dataset_fingerprint[:12]}; these are {stream.num_samples}, "
                              f"{stream.dataset_fingerprint[:12]}); use a new path for a new dataset")
        return
    atomic_write(path, fmt.dump_model(stream))


def finalize_cache(path: str | Path) -> fmt.CacheManifest:
    """Check that every shard of the stream is present and consistent, then write ``manifest.json`` atomically.

    Idempotent; safe to call from several processes (they write the same bytes). Raises DistilError naming what is
    missing when the build is not complete.
    """
    root = Path(path)
    if not (root / fmt.BUILD).exists():
        raise DistilError(f"{root} is not a teacher cache (no {fmt.BUILD}); build one with build_cache")
    settings = fmt.read_model(root / fmt.BUILD, fmt.BuildSettings)
    if not (root / fmt.STREAM).exists():
        raise DistilError(f"the cache at {root} is incomplete: no part has finished reading the samples yet; "
                          "run (or resume) the build")
    stream = fmt.read_model(root / fmt.STREAM, fmt.StreamInfo)
    missing = [i for i in range(stream.num_shards) if not _shard_done(root, i)]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DistilError(f"the cache at {root} is incomplete: {len(missing)} of {stream.num_shards} shards missing "
                          f"(indices {shown}); run (or resume) the parts that compute them")
    records = [fmt.read_model(root / fmt.shard_record_file(i), fmt.ShardRecord) for i in range(stream.num_shards)]
    vocabs, layouts = {r.vocab_size for r in records}, {r.layout for r in records}
    if len(vocabs) > 1 or len(layouts) > 1:
        raise DistilError(f"shards of {root} disagree (vocab sizes {sorted(vocabs)}, layouts {sorted(layouts)}); "
                          "the parts ran different teachers: rebuild")
    ids = fmt.ranges_to_ids(r for rec in records for r in rec.sample_ids)
    if len(np.unique(ids)) != len(ids):
        raise DistilError(f"sample ids repeat across the samples of {root}; every sample needs a distinct id")
    if len(ids) != stream.num_samples or sum(r.num_positions for r in records) != stream.num_positions:
        raise DistilError(f"the shards of {root} do not add up to the sample stream; rebuild the cache")
    fields = settings.fields
    manifest = fmt.CacheManifest(
        mode=settings.mode, k=settings.k, num_draws=settings.num_draws, sampling=settings.sampling,
        temperature=settings.temperature,
        seed=settings.seed, layout=records[0].layout if records else "sequence",
        vocab_size=records[0].vocab_size if records else 1, seq_len=fields.seq_len, teacher=fields.teacher,
        teacher_hash=fields.teacher_hash, tokenizer_hash=fields.tokenizer_hash,
        dataset_fingerprint=stream.dataset_fingerprint, notes=fields.notes,
        dtypes=fmt.storage_dtypes(settings.mode, records[0].vocab_size if records else 1, settings.num_draws),
        shard_size=settings.shard_size, num_samples=stream.num_samples, num_positions=stream.num_positions,
        shards=records,
    )
    atomic_write(root / fmt.MANIFEST, fmt.dump_model(manifest))
    return manifest


class _Progress:
    """A rich progress bar over samples, with tokens (kept positions) per second of this process's teacher work."""

    def __init__(self, enabled: bool, total: int | None, part: int, parts: int):
        self.enabled, self.total = enabled, total
        self.label = "teacher cache" + (f" part {part}/{parts}" if parts > 1 else "")
        self.done_positions, self.t0 = 0, time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[tps]}"), TimeElapsedColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, tps="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)  # type: ignore[arg-type]

    def positions(self, n: int) -> None:
        self.done_positions += n
        if self.enabled:
            rate = self.done_positions / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, tps=f"{rate:,.0f} tok/s")

    def samples(self, n: int) -> None:
        if self.enabled:
            self.bar.advance(self.task, n)

    skip = samples
