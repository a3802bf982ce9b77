"""Damaged shards are reported by name; a run that does not match the cache is refused field by field."""

from __future__ import annotations

import json

import pytest

from distil.cache import format as fmt
from distil.cache.build import build_cache
from distil.cache.reader import TeacherCache
from distil.errors import DistilError

FIELDS = {"teacher": "tiny-llama", "teacher_hash": "aa11", "tokenizer_hash": "bb22", "seq_len": 24}


@pytest.fixture
def cache_dir(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples, teacher_fn, k=8, shard_size=5, progress=False, manifest_fields=FIELDS)
    return tmp_path


def _flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_changed_shard_is_named_on_first_read(cache_dir, samples):
    _flip_byte(cache_dir / fmt.shard_file(1))
    cache = TeacherCache(cache_dir)  # sizes match: opening is cheap and succeeds
    assert cache.targets([samples[0]["id"]])["mask"].any()  # shard 0 is fine
    with pytest.raises(DistilError, match="shard-000001.safetensors .* is damaged \\(sha256"):
        cache.targets([samples[6]["id"]])
    with pytest.raises(DistilError, match="shard-000001.safetensors"):
        TeacherCache(cache_dir, verify="full")


def test_truncated_or_missing_shard_is_named_at_open(cache_dir):
    path = cache_dir / fmt.shard_file(2)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    expected = f"shard-000002.safetensors .* \\(truncated or changed: {len(data) - 7} bytes, expected {len(data)}"
    with pytest.raises(DistilError, match=expected):
        TeacherCache(cache_dir)
    path.unlink()
    with pytest.raises(DistilError, match="shard-000002.safetensors .* is missing"):
        TeacherCache(cache_dir)


def test_unreadable_header_is_named(cache_dir, samples):
    path = cache_dir / fmt.shard_file(0)
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"  # the JSON header
    path.write_bytes(bytes(data))
    cache = TeacherCache(cache_dir, verify="size")  # skip the checksum: the header itself is unreadable
    with pytest.raises(DistilError, match="shard-000000.safetensors .* cannot be read"):
        cache.targets([samples[0]["id"]])


def test_damaged_manifest_is_refused(cache_dir):
    (cache_dir / fmt.MANIFEST).write_text("{not json")
    with pytest.raises(DistilError, match="manifest.json is not a valid CacheManifest"):
        TeacherCache(cache_dir)
    manifest = json.loads((cache_dir / fmt.STREAM).read_text())
    manifest["surprise"] = 1  # extra keys are forbidden everywhere
    (cache_dir / fmt.STREAM).write_text(json.dumps(manifest))
    with pytest.raises(DistilError, match="stream.json is not a valid StreamInfo"):
        fmt.read_model(cache_dir / fmt.STREAM, fmt.StreamInfo)


def test_a_damaged_shard_is_repaired_by_resuming(cache_dir, samples, teacher_fn, helpers):
    before = helpers.files_of(cache_dir)
    _flip_byte(cache_dir / fmt.shard_file(3))
    (cache_dir / fmt.shard_file(3)).unlink()  # as the error message says: delete the shard and its record
    (cache_dir / fmt.shard_record_file(3)).unlink()
    result = build_cache(cache_dir, samples, teacher_fn, k=8, shard_size=5, progress=False, manifest_fields=FIELDS)
    assert result.shards_written == 1 and helpers.files_of(cache_dir) == before
    TeacherCache(cache_dir, verify="full")


def test_matching_run_is_accepted(cache_dir):
    cache = TeacherCache(cache_dir)
    cache.check_compatible(teacher_hash="aa11", tokenizer_hash="bb22", seq_len=24, temperature=1.0, vocab_size=300,
                           dataset_fingerprint=cache.manifest.dataset_fingerprint, mode="topk", k=8)
    cache.check_compatible(tokenizer_hash=None)  # None: not checked


def test_mismatch_is_refused_naming_field_and_values(cache_dir):
    cache = TeacherCache(cache_dir)
    with pytest.raises(DistilError) as err:
        cache.check_compatible(tokenizer_hash="cc33", seq_len=32, dataset_fingerprint="ff00")
    msg = str(err.value)
    assert "tokenizer_hash: the cache has 'bb22', this run has 'cc33'" in msg
    assert "seq_len: the cache has 24, this run has 32" in msg
    assert f"dataset_fingerprint: the cache has '{cache.manifest.dataset_fingerprint}', this run has 'ff00'" in msg
    with pytest.raises(DistilError, match="temperature: the cache has 1.0, this run has 2.0"):
        cache.check_compatible(temperature=2.0)
    as_it_is = r"settings \(to read it as it is: teacher.cache.mode=topk teacher.cache.k=8\)"
    with pytest.raises(DistilError, match=as_it_is):  # e.g. a top-k cache built before the sampled default
        cache.check_compatible(mode="sample", k=16)
    with pytest.raises(DistilError, match="unknown field 'tokeniser_hash'"):
        cache.check_compatible(tokeniser_hash="bb22")


def test_unrecorded_field_cannot_be_confirmed(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples[:3], teacher_fn, k=4, progress=False)
    with pytest.raises(DistilError, match="tokenizer_hash: the cache has \\(not recorded\\), this run has 'bb22'"):
        TeacherCache(tmp_path).check_compatible(tokenizer_hash="bb22")


def test_incomplete_or_foreign_directory_is_refused(tmp_path):
    with pytest.raises(DistilError, match="is not a teacher cache"):
        TeacherCache(tmp_path)
    with pytest.raises(DistilError, match="verify must be one of"):
        TeacherCache(tmp_path, verify="sometimes")


def test_cache_survives_pickling_for_dataloader_workers(cache_dir, samples):
    import pickle

    cache = TeacherCache(cache_dir)
    ids = [s["id"] for s in samples[:4]]
    want = cache.targets(ids)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 20_000  # the index travels, the memory maps do not
    got = clone.targets(ids)
    assert all(t.equal(got[k]) for k, t in want.items())
