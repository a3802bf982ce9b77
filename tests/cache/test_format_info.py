"""Format details (dtypes, id ranges, strict schemas, hashes, fingerprints) and ``cache_info``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from rich.console import Console

from distil.cache import format as fmt
from distil.cache.build import build_cache
from distil.cache.info import cache_info, render_cache_info
from distil.cache.reader import TeacherCache
from distil.errors import DistilError


@pytest.mark.parametrize(
    "vocab, dtype",
    [(2, np.uint8), (256, np.uint8), (257, np.uint16), (49152, np.uint16), (65536, np.uint16), (65537, np.int32),
     (152064, np.int32)],
)
def test_ids_use_the_smallest_integer_type(vocab, dtype):
    assert fmt.id_dtype(vocab) == np.dtype(dtype)
    assert np.iinfo(fmt.id_dtype(vocab)).max >= vocab - 1


def test_counts_and_storage_dtypes():
    assert fmt.count_dtype(255) == np.uint8 and fmt.count_dtype(256) == np.uint16
    assert fmt.storage_dtypes("topk", 49152, None) == {
        "ids": "uint16", "keep": "bool", "lengths": "int32", "logprobs": "float16", "sample_ids": "int64",
        "tail_logmass": "float16"}
    assert fmt.storage_dtypes("sample", 49152, 300)["counts"] == "uint16"


@given(st.sets(st.integers(min_value=-(2**40), max_value=2**40), max_size=60))
def test_id_ranges_round_trip(ids):
    ranges = fmt.ids_to_ranges(np.array(sorted(ids), dtype=np.int64))
    assert fmt.ranges_to_ids(ranges).tolist() == sorted(ids)
    assert all(b > a for a, b in ranges) and all(r1[1] < r2[0] for r1, r2 in zip(ranges, ranges[1:]))


def test_contiguous_ids_are_one_range():
    assert fmt.ids_to_ranges(np.arange(10, 1000)) == [(10, 1000)]


def test_schemas_forbid_unknown_keys():
    with pytest.raises(ValidationError):
        fmt.ManifestFields(tokeniser_hash="x")
    with pytest.raises(ValidationError):
        fmt.BuildSettings(mode="topk", k=4, temperature=1.0, shard_size=8, extra=1)
    with pytest.raises(ValidationError):
        fmt.BuildSettings(mode="topk", k=4, temperature=0.0, shard_size=8)


def test_weights_hash():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    h = fmt.weights_hash(sd)
    assert h == fmt.weights_hash(dict(reversed(list(sd.items()))))  # order of the dict does not matter
    sd["weight"][1, 2] += 1e-3
    assert fmt.weights_hash(sd) != h
    assert fmt.weights_hash({k: v.bfloat16() for k, v in sd.items()}) != fmt.weights_hash(sd)  # dtype counts
    renamed = {"other." + k: v for k, v in sd.items()}
    assert fmt.weights_hash(renamed) != fmt.weights_hash(sd)


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_hash():
    base = {"<unk>": 0, "a": 1, "b": 2, "c": 3}
    h = fmt.tokenizer_hash(_tokenizer(base))
    assert h == fmt.tokenizer_hash(_tokenizer(dict(reversed(list(base.items())))))
    assert h != fmt.tokenizer_hash(_tokenizer({**base, "d": 4}))
    assert h != fmt.tokenizer_hash(_tokenizer({"<unk>": 0, "a": 2, "b": 1, "c": 3}))


def test_dataset_fingerprint(samples):
    fp = fmt.dataset_fingerprint(samples)
    assert fp == fmt.dataset_fingerprint(list(reversed(samples)))  # order-independent (shuffled loaders agree)
    changed = [dict(s) for s in samples]
    changed[4]["input_ids"] = changed[4]["input_ids"].clone()
    changed[4]["input_ids"][0] += 1
    assert fmt.dataset_fingerprint(changed) != fp
    renumbered = [{**s, "id": s["id"] + 1} for s in samples]
    assert fmt.dataset_fingerprint(renumbered) != fp
    assert fmt.dataset_fingerprint(samples[:-1]) != fp
    # Only ids and input_ids count: extra fields the training pipeline adds do not change it.
    assert fmt.dataset_fingerprint([{**s, "labels": s["input_ids"]} for s in samples]) == fp


def test_build_fingerprint_is_the_helper_fingerprint(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples, teacher_fn, k=4, shard_size=6, shard=(0, 1), progress=False)
    assert TeacherCache(tmp_path).manifest.dataset_fingerprint == fmt.dataset_fingerprint(samples)


def test_info_of_a_complete_cache(tmp_path, samples, teacher_fn):
    fields = {"teacher": "tiny-llama", "teacher_hash": "ab" * 32, "tokenizer_hash": "cd" * 32, "seq_len": 24,
              "notes": {"recipe": "unit-test"}}
    build_cache(tmp_path, samples, teacher_fn, k=8, shard_size=5, progress=False, manifest_fields=fields)
    info = cache_info(tmp_path)
    manifest = TeacherCache(tmp_path).manifest
    shard_bytes = sum(r.bytes for r in manifest.shards)
    assert info["complete"] and info["shard_bytes"] == shard_bytes
    assert info["size_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert info["bytes_per_token"] == pytest.approx(shard_bytes / manifest.num_positions)
    assert info["coverage"] == {"shards_done": 5, "shards_expected": 5, "samples_done": 23, "samples_expected": 23,
                                "tokens_done": manifest.num_positions, "tokens_expected": manifest.num_positions}
    assert info["teacher"] == {"name": "tiny-llama", "weights_hash": "ab" * 32, "tokenizer_hash": "cd" * 32}
    assert info["settings"]["k"] == 8 and info["settings"]["vocab_size"] == 300
    assert info["notes"] == {"recipe": "unit-test"}
    targets = TeacherCache(tmp_path).targets([s["id"] for s in samples], normalize=False)  # as stored
    mass = targets["tail_logmass"][targets["mask"]].double().exp()
    assert info["tail_mass"]["mean"] == pytest.approx(float(mass.mean()), rel=1e-6)
    assert info["tail_mass"]["median"] == pytest.approx(float(np.median(mass.numpy())), rel=1e-6)
    console = Console(record=True, width=120)
    console.print(render_cache_info(info))
    text = console.export_text()
    for expected in ("complete", "bytes per token", "tiny-llama", "23 of 23", "topk (k=8)", "ids=uint16",
                     "teacher mass outside top k"):
        assert expected in text


def test_info_of_a_build_in_progress(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples, teacher_fn, k=8, shard_size=5, shard=(0, 2), progress=False)
    info = cache_info(tmp_path)
    assert not info["complete"]
    assert info["coverage"]["shards_done"] == 3 and info["coverage"]["shards_expected"] == 5
    assert info["coverage"]["samples_done"] == 13 and info["coverage"]["samples_expected"] == 23
    console = Console(record=True, width=120)
    console.print(render_cache_info(info))
    text = console.export_text()
    assert "incomplete" in text and "13 of 23" in text


def test_sampled_caches_record_their_sampling(tmp_path, samples, teacher_fn):
    build_cache(tmp_path / "s", samples, teacher_fn, mode="sample", num_draws=16, sampling="systematic",
                shard_size=8, progress=False)
    build_cache(tmp_path / "m", samples, teacher_fn, mode="sample", num_draws=16, shard_size=8, progress=False)
    assert TeacherCache(tmp_path / "s").manifest.sampling == "systematic"
    assert TeacherCache(tmp_path / "m").manifest.sampling == "multinomial"
    assert cache_info(tmp_path / "s")["settings"]["sampling"] == "systematic"
    with pytest.raises(DistilError, match="sampling: cache has 'systematic', this build asks 'multinomial'"):
        build_cache(tmp_path / "s", samples, teacher_fn, mode="sample", num_draws=16, sampling="multinomial",
                    shard_size=8, progress=False)
    with pytest.raises(DistilError, match="invalid cache settings"):
        build_cache(tmp_path / "x", samples, teacher_fn, mode="sample", sampling="stratified", progress=False)


def test_sampled_caches_from_before_sampling_was_recorded_read_as_multinomial(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples, teacher_fn, mode="sample", num_draws=16, sampling="multinomial", shard_size=8,
                progress=False)
    for name in (fmt.MANIFEST, fmt.BUILD):
        data = json.loads((tmp_path / name).read_text())
        del data["sampling"]
        (tmp_path / name).write_text(json.dumps(data))
    assert TeacherCache(tmp_path).manifest.sampling == "multinomial"
    build_cache(tmp_path, samples, teacher_fn, mode="sample", num_draws=16, sampling="multinomial", shard_size=8,
                progress=False)  # resuming it with the sampling it used is accepted
    with pytest.raises(ValidationError, match="sampling is for mode 'sample'"):
        fmt.BuildSettings(mode="topk", k=4, temperature=1.0, shard_size=8, sampling="systematic")


def test_a_cache_of_another_format_version_is_refused_in_one_line(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples, teacher_fn, k=4, shard_size=8, progress=False)
    data = json.loads((tmp_path / fmt.MANIFEST).read_text())
    (tmp_path / fmt.MANIFEST).write_text(json.dumps({**data, "version": fmt.VERSION + 1}))
    with pytest.raises(DistilError, match=r"format version 2, this distil reads version 1: rebuild it with "
                                          r"`distil cache build`") as e:
        TeacherCache(tmp_path)
    assert "\n" not in str(e.value)
