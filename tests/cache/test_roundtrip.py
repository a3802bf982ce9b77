"""Build a cache from a tiny real teacher and read it back: every mode, masks, classifiers, any batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distil.cache.build import build_cache
from distil.cache.reader import TeacherCache
from distil.errors import DistilError
from distil.losses.cached import cached_divergence

K = 8


def test_topk_round_trip_matches_the_dense_teacher(tmp_path, samples, teacher, teacher_fn, helpers):
    result = build_cache(tmp_path, samples, teacher_fn, k=K, shard_size=5, batch_size=3, progress=False,
                         temperature=1.5)
    assert result.complete and result.num_shards == 5 and result.shards_written == 5
    cache = TeacherCache(tmp_path)
    assert len(cache) == len(samples) and cache.manifest.dtypes["ids"] == "uint16"
    assert cache.manifest.num_positions == sum(len(s["input_ids"]) for s in samples)
    ids = [s["id"] for s in samples]
    t = cache.targets(ids, normalize=False)
    assert t["ids"].shape == (len(samples), 19, K) and t["ids"].dtype == torch.int64
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert t["mask"][b, :n].all() and not t["mask"][b, n:].any()
        dense = helpers.dense_logprobs(teacher, s, temperature=1.5)
        stored = t["ids"][b, :n]
        # The stored ids are the teacher's top k, their log-probs are the teacher's (to float16 precision) ...
        torch.testing.assert_close(t["logprobs"][b, :n].double(), dense.gather(-1, stored), atol=4e-3, rtol=2e-3)
        kth = dense.gather(-1, stored).min(-1).values
        rest = dense.scatter(-1, stored, -math.inf)
        assert (rest.max(-1).values <= kth + 1e-5).all()
        # ... and the tail is the exact mass of all the other tokens.
        torch.testing.assert_close(t["tail_logmass"][b, :n].double(), rest.logsumexp(-1), atol=4e-3, rtol=2e-3)
        assert torch.isinf(t["logprobs"][b, n:]).all()
    # normalize=True removes the float16 rounding: top-k plus tail sum to one.
    norm = cache.targets(ids)
    total = torch.cat([norm["logprobs"], norm["tail_logmass"][..., None]], -1).logsumexp(-1)
    assert torch.allclose(total[norm["mask"]], torch.zeros(()), atol=1e-6)


def test_k_equal_vocab_through_the_cache_gives_the_dense_kl(tmp_path, samples, teacher, student, teacher_fn, helpers):
    vocab = teacher.config.vocab_size
    build_cache(tmp_path, samples[:6], teacher_fn, k=vocab, shard_size=4, batch_size=2, progress=False)
    cache = TeacherCache(tmp_path)
    for s in samples[:6]:
        t = cache.targets([s["id"]])
        with torch.no_grad():
            z = student(input_ids=s["input_ids"][None]).logits
        got = cached_divergence(z, t).item()
        assert cached_divergence(z, t, temperature=1.0).item() == got
        p = helpers.dense_logprobs(teacher, s)
        q = torch.log_softmax(z[0].double(), -1)
        want = (p.exp() * (p - q)).sum(-1).mean().item()
        assert got == pytest.approx(want, rel=2e-3)


def test_sample_mode_round_trip(tmp_path, samples, teacher, teacher_fn, helpers):
    build_cache(tmp_path, samples, teacher_fn, mode="sample", num_draws=32, shard_size=6, batch_size=4,
                progress=False, seed=7)
    cache = TeacherCache(tmp_path)
    assert cache.manifest.dtypes["counts"] == "uint8" and cache.manifest.num_draws == 32
    t = cache.targets([s["id"] for s in samples])
    m = t["mask"]
    torch.testing.assert_close(t["weights"].sum(-1)[m], torch.ones(int(m.sum())))
    assert (t["weights"][~m] == 0).all()
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        dense = helpers.dense_logprobs(teacher, s)
        entropy = -(dense.exp() * dense).sum(-1)
        torch.testing.assert_close(t["entropy"][b, :n].double(), entropy, rtol=1e-5, atol=1e-5)
        drawn = t["weights"][b, :n] > 0
        assert (t["ids"][b, :n][drawn] < dense.shape[-1]).all()
        # Draws depend on (seed, sample id) only: distinct tokens appear once per row.
        for row in range(n):
            ids = t["ids"][b, row][drawn[row]]
            assert len(set(ids.tolist())) == len(ids)


@pytest.mark.parametrize("sampling", ["multinomial", "systematic"])
def test_sample_draws_do_not_depend_on_batching_or_sharding(tmp_path, samples, teacher, sampling):
    # Each row goes through the teacher alone: a padded batch's logits differ from a lone row's in the last bits on
    # some CPUs (another matmul blocking), and a draw near a bin edge would follow them. What the cache owns is
    # that, given the logits, the draws depend on (seed, sample id) only.
    def rowwise_teacher(batch):
        out = torch.zeros(*batch["input_ids"].shape, teacher.config.vocab_size)
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"].bool())):
            out[row, : int(mask.sum())] = teacher(input_ids=ids[mask][None]).logits[0]
        return out

    for name, shard_size, batch_size in (("a", 5, 1), ("b", 7, 4)):
        build_cache(tmp_path / name, samples, rowwise_teacher, mode="sample", num_draws=16, sampling=sampling,
                    shard_size=shard_size, batch_size=batch_size, progress=False)
    ids = [s["id"] for s in samples]
    a, b = TeacherCache(tmp_path / "a").targets(ids), TeacherCache(tmp_path / "b").targets(ids)
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["weights"], b["weights"])


def test_full_mode_round_trip(tmp_path, samples, teacher, teacher_fn, helpers):
    build_cache(tmp_path, samples[:5], teacher_fn, mode="full", shard_size=2, progress=False)
    t = TeacherCache(tmp_path).targets([s["id"] for s in samples[:5]])
    for b, s in enumerate(samples[:5]):
        n = len(s["input_ids"])
        torch.testing.assert_close(t["logprobs"][b, :n].double(), helpers.dense_logprobs(teacher, s),
                                   atol=4e-3, rtol=2e-3)


def test_labels_and_masks_choose_the_positions(tmp_path, samples, teacher_fn):
    plain = samples[:4]
    labelled = []
    for i, s in enumerate(plain):
        labels = s["input_ids"].clone()
        labels[: 2 + i] = -100  # a prompt of 2 + i tokens
        labelled.append({**s, "labels": labels})
    masked = [{**s, "mask": torch.arange(len(s["input_ids"])) % 2 == 0} for s in plain]
    for name, group in (("plain", plain), ("labels", labelled), ("mask", masked)):
        build_cache(tmp_path / name, group, teacher_fn, k=K, shard_size=3, progress=False)
    ids = [s["id"] for s in plain]
    full = TeacherCache(tmp_path / "plain").targets(ids)
    for name in ("labels", "mask"):
        t = TeacherCache(tmp_path / name).targets(ids)
        for b, s in enumerate(plain):
            n = len(s["input_ids"])
            if name == "labels":
                want = torch.zeros(n, dtype=torch.bool)
                want[1 + b : n - 1] = True  # logits at t predict the label at t + 1
            else:
                want = torch.arange(n) % 2 == 0
            assert torch.equal(t["mask"][b, :n], want)
            assert torch.equal(t["ids"][b, :n][want], full["ids"][b, :n][want])
            assert torch.equal(t["logprobs"][b, :n][want], full["logprobs"][b, :n][want])
            assert torch.isinf(t["logprobs"][b, :n][~want]).all()
    positions = {name: TeacherCache(tmp_path / name).manifest.num_positions for name in ("plain", "labels")}
    assert positions["labels"] < positions["plain"]


def test_any_order_and_batching_give_identical_targets(tmp_path, samples, teacher_fn):
    build_cache(tmp_path, samples, teacher_fn, k=K, shard_size=4, batch_size=3, progress=False)
    cache = TeacherCache(tmp_path)
    ids = [s["id"] for s in samples]
    whole = cache.targets(ids, seq_len=24)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))
    for chunk in np.array_split(order, 5):
        part = cache.targets([ids[i] for i in chunk], seq_len=24)
        assert torch.equal(part.pop("temperature"), whole["temperature"])
        for key in part:
            assert torch.equal(part[key], whole[key][torch.from_numpy(chunk)])
    one = cache.targets(torch.tensor([ids[3]]))
    assert torch.equal(one["ids"], whole["ids"][3:4, : one["ids"].shape[1]])


def test_classifier_full_distribution(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).eval()
    xs = [{"id": i, "x": torch.randn(6)} for i in range(10)]
    result = build_cache(tmp_path, xs, lambda batch: net(batch["x"]), mode="full", shard_size=4, batch_size=3,
                         temperature=2.0, progress=False)
    cache = TeacherCache(tmp_path)
    assert result.complete and cache.manifest.layout == "single" and cache.manifest.dtypes["logprobs"] == "float16"
    t = cache.targets([7, 2, 9])
    assert t["logprobs"].shape == (3, 5) and t["mask"].all()
    with torch.no_grad():
        want = torch.log_softmax(net(torch.stack([xs[i]["x"] for i in (7, 2, 9)])) / 2.0, -1)
    torch.testing.assert_close(t["logprobs"], want, atol=2e-3, rtol=2e-3)
    # Top-k over few classes works the same way.
    build_cache(tmp_path / "topk", xs, lambda batch: net(batch["x"]), k=2, shard_size=4, progress=False)
    t2 = TeacherCache(tmp_path / "topk").targets([7])
    assert t2["ids"].shape == (1, 2) and t2["tail_logmass"].shape == (1,)


def test_seq_len_padding_and_refusals(tmp_path, samples, teacher_fn):
    with pytest.raises(DistilError, match="more than seq_len=10"):
        build_cache(tmp_path / "x", samples, teacher_fn, manifest_fields={"seq_len": 10}, progress=False)
    build_cache(tmp_path, samples, teacher_fn, k=K, manifest_fields={"seq_len": 20}, progress=False)
    cache = TeacherCache(tmp_path)
    longest = max(samples, key=lambda s: len(s["input_ids"]))
    assert cache.targets([longest["id"]], seq_len=32)["ids"].shape == (1, 32, K)
    with pytest.raises(DistilError, match="more than seq_len=4"):
        cache.targets([longest["id"]], seq_len=4)
    with pytest.raises(DistilError, match="sample id 5 is not in the teacher cache"):
        cache.targets([5])
    assert 5 not in cache and samples[0]["id"] in cache


def test_bad_teacher_output_and_samples_are_refused(tmp_path, samples, teacher_fn):
    with pytest.raises(DistilError, match="expected \\[batch=2, positions, vocab\\]"):
        build_cache(tmp_path / "a", samples, lambda b: teacher_fn(b)[:, 0], batch_size=2, progress=False)
    with pytest.raises(DistilError, match="integer 'id'"):
        build_cache(tmp_path / "b", [{"input_ids": torch.ones(3, dtype=torch.long)}], teacher_fn, progress=False)
    with pytest.raises(DistilError, match="distinct id"):
        build_cache(tmp_path / "c", [samples[0], samples[0]], teacher_fn, shard_size=1, progress=False)
    with pytest.raises(DistilError, match="cache mode must be one of"):
        build_cache(tmp_path / "d", samples, teacher_fn, mode="dense", progress=False)


def test_training_at_another_temperature_is_refused(tmp_path, samples, student, teacher_fn):
    build_cache(tmp_path, samples[:3], teacher_fn, k=K, temperature=2.0, progress=False)
    t = TeacherCache(tmp_path).targets([samples[0]["id"]])
    assert t["temperature"].item() == 2.0
    with torch.no_grad():
        z = student(input_ids=samples[0]["input_ids"][None]).logits
    from distil.losses.sparse import sparse_forward_kl

    want = sparse_forward_kl(z, t["ids"], t["logprobs"], tail_logmass=t["tail_logmass"], temperature=2.0,
                             mask=t["mask"])
    assert cached_divergence(z, t).item() == want.item()  # the cache's temperature by default
    with pytest.raises(DistilError, match="temperature 2, this loss asks 1"):
        cached_divergence(z, t, temperature=1.0)
