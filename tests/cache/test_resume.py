"""Resumed builds and builds split into parts write exactly the bytes of one uninterrupted build."""

from __future__ import annotations

import pytest

from distil.cache import format as fmt
from distil.cache.build import build_cache, finalize_cache
from distil.cache.info import cache_info
from distil.cache.reader import TeacherCache
from distil.errors import DistilError

SETTINGS = dict(k=8, shard_size=5, batch_size=2, progress=False, manifest_fields={"teacher": "tiny", "seq_len": 24})


class Counting:
    """The teacher function, counting its calls and optionally dying at one of them."""

    def __init__(self, fn, die_at: int | None = None):
        self.fn, self.die_at, self.calls = fn, die_at, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.die_at:
            raise RuntimeError("teacher died")
        return self.fn(batch)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_interrupted_build_resumes_to_identical_files(tmp_path, samples, teacher_fn, helpers, mode):
    reference = build_cache(tmp_path / "ref", samples, teacher_fn, mode=mode, **SETTINGS)
    assert reference.complete

    # Shard size 5 at batch size 2 is 3 teacher calls per shard: call 6 is the last batch of shard 1.
    flaky = Counting(teacher_fn, die_at=6)
    with pytest.raises(RuntimeError, match="teacher died"):
        build_cache(tmp_path / "run", samples, flaky, mode=mode, **SETTINGS)
    names = set(helpers.files_of(tmp_path / "run"))
    assert names == {fmt.BUILD, fmt.shard_file(0), fmt.shard_record_file(0)}  # no partial shard, no temp file
    with pytest.raises(DistilError, match="incomplete"):
        TeacherCache(tmp_path / "run")
    info = cache_info(tmp_path / "run")
    assert not info["complete"] and info["coverage"]["shards_done"] == 1
    assert info["coverage"]["samples_expected"] is None  # no part has seen the whole stream yet

    again = Counting(teacher_fn)
    result = build_cache(tmp_path / "run", samples, again, mode=mode, **SETTINGS)
    assert result.complete and result.shards_written == 4 and result.shards_skipped == 1
    assert again.calls == 3 * 3 + 2  # shards 1-3 (5 samples each) and shard 4 (3 samples): completed work is kept
    assert helpers.files_of(tmp_path / "run") == helpers.files_of(tmp_path / "ref")

    # Running a complete build again computes nothing and changes nothing.
    idle = Counting(teacher_fn)
    assert build_cache(tmp_path / "run", samples, idle, mode=mode, **SETTINGS).complete and idle.calls == 0
    assert helpers.files_of(tmp_path / "run") == helpers.files_of(tmp_path / "ref")


def test_a_partial_shard_is_never_trusted(tmp_path, samples, teacher_fn, helpers):
    build_cache(tmp_path / "ref", samples, teacher_fn, **SETTINGS)
    build_cache(tmp_path / "run", samples, Counting(teacher_fn), **SETTINGS)
    run = tmp_path / "run"
    # A crash during a write leaves a temp file; a shard without its record, or cut short, is computed again.
    (run / (fmt.shard_file(2) + ".tmp-123-abcdef01")).write_bytes(b"partial")
    (run / fmt.shard_record_file(3)).unlink()
    (run / fmt.MANIFEST).unlink()
    data = (run / fmt.shard_file(1)).read_bytes()
    (run / fmt.shard_file(1)).write_bytes(data[: len(data) // 2])
    calls = Counting(teacher_fn)
    assert cache_info(run)["temporary_files"] == 1
    result = build_cache(run, samples, calls, **SETTINGS)
    assert result.complete and result.shards_written == 2 and calls.calls == 6
    (run / (fmt.shard_file(2) + ".tmp-123-abcdef01")).unlink()
    assert helpers.files_of(run) == helpers.files_of(tmp_path / "ref")


def test_a_killed_writers_temporary_is_removed_when_the_file_is_written_again(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from distil.cache.writer import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, target = socket.gethostname(), tmp_path / fmt.shard_file(0)
    stale = tmp_path / f"{target.name}.tmp-{host}-{int(dead.stdout)}-0123abcd"  # its writer was killed
    live = tmp_path / f"{target.name}.tmp-{host}-{os.getpid()}-0123abcd"  # another part, still writing
    remote = tmp_path / f"{target.name}.tmp-elsewhere-{int(dead.stdout)}-0123abcd"  # another machine's
    for tmp in (stale, live, remote):
        tmp.write_bytes(b"partial")
    atomic_write(target, b"shard")
    assert target.read_bytes() == b"shard"
    assert not stale.exists() and live.exists() and remote.exists()


def test_parts_merge_to_the_single_process_cache(tmp_path, samples, teacher_fn, helpers):
    build_cache(tmp_path / "ref", samples, teacher_fn, **SETTINGS)
    run = tmp_path / "parts"
    first = build_cache(run, samples, teacher_fn, shard=(1, 3), **SETTINGS)
    assert not first.complete and first.shards_written == 2 and first.num_shards == 5  # shards 1 and 4
    assert build_cache(run, samples, teacher_fn, shard=(0, 3), **SETTINGS).shards_written == 2  # shards 0 and 3
    with pytest.raises(DistilError, match="1 of 5 shards missing \\(indices 2\\)"):
        finalize_cache(run)
    assert cache_info(run)["coverage"]["samples_expected"] == len(samples)
    last = build_cache(run, samples, teacher_fn, shard=(2, 3), **SETTINGS)
    assert last.complete and last.shards_written == 1
    assert helpers.files_of(run) == helpers.files_of(tmp_path / "ref")
    # finalize is idempotent (ranks may all call it after a barrier).
    finalize_cache(run)
    assert helpers.files_of(run) == helpers.files_of(tmp_path / "ref")


def test_a_build_split_one_way_can_be_finished_another(tmp_path, samples, teacher_fn, helpers):
    build_cache(tmp_path / "ref", samples, teacher_fn, **SETTINGS)
    run = tmp_path / "mixed"
    build_cache(run, samples, teacher_fn, shard=(0, 2), **SETTINGS)
    calls = Counting(teacher_fn)
    assert build_cache(run, samples, calls, **SETTINGS).shards_written == 2
    assert helpers.files_of(run) == helpers.files_of(tmp_path / "ref")


def test_resume_with_other_settings_or_samples_is_refused(tmp_path, samples, teacher_fn, helpers):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        build_cache(run, samples, Counting(teacher_fn, die_at=4), **SETTINGS)
    with pytest.raises(DistilError, match="k: cache has 8, this build asks 4"):
        build_cache(run, samples, teacher_fn, **{**SETTINGS, "k": 4})
    with pytest.raises(DistilError, match="temperature: cache has 1.0, this build asks 2.0"):
        build_cache(run, samples, teacher_fn, **SETTINGS, temperature=2.0)
    changed = [dict(s) for s in samples]
    changed[1]["input_ids"] = changed[1]["input_ids"].flip(0)
    with pytest.raises(DistilError, match="built from other samples"):
        build_cache(run, changed, teacher_fn, **SETTINGS)
    reordered = samples[5:] + samples[:5]
    with pytest.raises(DistilError, match="built from other samples"):
        build_cache(run, reordered, teacher_fn, **SETTINGS)
    with pytest.raises(DistilError, match="tokeniser_hash"):
        build_cache(tmp_path / "x", samples, teacher_fn, manifest_fields={"tokeniser_hash": "abc"}, progress=False)
    with pytest.raises(DistilError, match="shard must be"):
        build_cache(tmp_path / "y", samples, teacher_fn, shard=(3, 3), progress=False)
