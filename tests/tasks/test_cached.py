"""Training from an offline teacher cache: a split build, then students trained with the teacher never loaded."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distil.cli import main
from distil.config.load import validate_recipe
from distil.distill.cached import CachedLMObjective
from distil.errors import DistilError
from distil.runner import run_recipe
from distil.tasks import causal_lm as lm
from distil.tasks import causal_lm_cache as cached
from distil.students import make_student


def cache_recipe(tiny_lm, tmp_path, student_source=None, **cache):
    student = {"arch": "hf", "source": str(student_source)} if student_source else {"arch": "from_teacher",
                                                                                    "num_layers": 2}
    return {
        "name": "tiny-cache", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 32,
                 "max_train_tokens": 2500, "eval_tokens": 128},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)},
                    "cache": {"path": str(tmp_path / "cache"), "mode": "topk", "k": 16, "shard_size": 16,
                              **cache}},
        "student": {"model": student},
        "loss": {"alpha": 0.5, "temperature": 1.0},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1},
        "output_dir": str(tmp_path / "run"), "generations_shown": 1,
    }


def test_split_build_then_training_never_loads_the_teacher(tiny_lm, tmp_path, monkeypatch):
    import yaml

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    student_dir = tmp_path / "student"
    make_student(teacher, num_layers=2).save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(student_dir)
    data = cache_recipe(tiny_lm, tmp_path, student_source=student_dir)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["cache", "build", str(tmp_path / "r.yaml"), "--shard", "1/2", "-q"]) == 0
    assert not cached.cache_is_complete(tmp_path / "cache")  # part 0 is missing
    assert main(["cache", "build", str(tmp_path / "r.yaml"), "--shard", "0/2", "-q"]) == 0
    assert cached.cache_is_complete(tmp_path / "cache")

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(lm, "load_teacher", no_teacher)
    summary = run_recipe(validate_recipe(data), show_progress=False)
    assert summary["teacher_source"] == "cache" and summary["arms"]["teacher"]["from_cache"]
    assert 0 <= summary["arms"]["distilled"]["agreement"] <= 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/kd" in r for r in records if r["arm"] == "distilled")


def test_cached_kd_with_full_k_equals_live_kd(tiny_lm, tmp_path):
    """k = vocabulary: the cache-fed loss equals the live teacher's forward KL (fp16 storage tolerance)."""
    from distil.cache import TeacherCache
    from distil.config.schema import LossSpec
    from distil.data.sources.text import lm_batch, load_corpus
    from distil.distill.lm import CausalLMObjective
    from distil.distill.pair import Teacher

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    recipe = validate_recipe(cache_recipe(tiny_lm, tmp_path, k=teacher.config.vocab_size))
    corpus = load_corpus(recipe.data, tokenizer)
    cached.build_for_recipe(recipe, teacher, tokenizer, corpus, show_progress=False)
    student = make_student(teacher, num_layers=2)
    batch = {"id": torch.arange(4), **lm_batch(corpus.train[:4])}
    spec = LossSpec(alpha=0.5, temperature=1.0, fused=False)
    cpu = torch.device("cpu")
    from_cache = CachedLMObjective(student, TeacherCache(tmp_path / "cache"), spec, device=cpu).loss(batch)
    live = CausalLMObjective(student, Teacher(teacher), spec, vocab_size=teacher.config.vocab_size, device=cpu).loss(batch)
    torch.testing.assert_close(from_cache["kd"], live["kd"], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(from_cache["ce"], live["ce"])


def test_a_cache_for_other_text_is_refused(tiny_lm, tmp_path):
    data = cache_recipe(tiny_lm, tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    from distil.data.sources.text import load_corpus

    recipe = validate_recipe(data)
    cached.build_for_recipe(recipe, teacher, tokenizer, load_corpus(recipe.data, tokenizer), show_progress=False)
    data["data"]["max_train_tokens"] = 2000
    other = validate_recipe(data)
    with pytest.raises(DistilError, match="dataset_fingerprint"):
        cached.open_cache(other, tokenizer, load_corpus(other.data, tokenizer))


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_the_fused_cached_loss_equals_the_plain_one(tiny_lm, tmp_path, mode):
    """The objective's fused path (no full logits) gives the plain path's loss terms and parameter gradients."""
    from distil.cache import TeacherCache
    from distil.config.schema import LossSpec
    from distil.data.sources.text import lm_batch, load_corpus

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    extra = {"mode": "sample", "num_draws": 32} if mode == "sample" else {}
    recipe = validate_recipe(cache_recipe(tiny_lm, tmp_path, **extra))
    corpus = load_corpus(recipe.data, tokenizer)
    cached.build_for_recipe(recipe, teacher, tokenizer, corpus, show_progress=False)
    student = make_student(teacher, num_layers=2)
    batch = {"id": torch.arange(4), **lm_batch(corpus.train[:4])}
    cache, cpu = TeacherCache(tmp_path / "cache"), torch.device("cpu")
    results = []
    for fused in (True, False):
        spec = LossSpec(alpha=0.7, temperature=1.0, fused=fused)
        objective = CachedLMObjective(student, cache, spec, device=cpu)
        terms = objective.loss(batch)
        assert objective.fused is fused
        student.zero_grad()
        terms["loss"].backward()
        results.append((terms, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (fused_terms, fused_grads), (plain_terms, plain_grads) = results
    for name in ("loss", "kd", "ce"):  # fp32 sums of a few hundred terms: agreement to ~1e-6 relative
        torch.testing.assert_close(fused_terms[name], plain_terms[name], rtol=1e-4, atol=1e-6)
    assert len(fused_grads) == len(plain_grads)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_a_sampled_cache_run_measures_agreement_from_the_kept_predictions(tiny_lm, tmp_path):
    """A sampled cache has no top-1 ids: held-out agreement reads the teacher's predictions kept at build time,
    which equal a top-k cache's first ids for the same teacher and text."""
    import yaml

    from distil.cache import TeacherCache

    sampled = cache_recipe(tiny_lm, tmp_path, mode="sample", num_draws=16)
    summary = run_recipe(validate_recipe(sampled), show_progress=False)
    assert 0 <= summary["arms"]["distilled"]["agreement"] <= 1
    topk = cache_recipe(tiny_lm, tmp_path / "topk")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(topk))
    assert main(["cache", "build", str(tmp_path / "r.yaml"), "-q"]) == 0
    recipe = validate_recipe(topk)
    kept = cached.eval_predictions(TeacherCache(tmp_path / "topk" / "cache"), 4, 32)  # from teacher_top1.json
    (tmp_path / "topk" / "cache" / cached.TEACHER_TOP1).unlink()
    first_ids = cached.eval_predictions(TeacherCache(tmp_path / "topk" / "cache"), 4, 32)
    assert recipe.data.eval_tokens == 128 and torch.equal(kept, first_ids)
    (tmp_path / "cache" / cached.TEACHER_TOP1).unlink()  # a sampled cache from before the predictions were kept
    with pytest.raises(DistilError, match="delete .*teacher_eval.json and run again"):
        cached.eval_predictions(TeacherCache(tmp_path / "cache"), 4, 32)


def test_the_default_cache_is_32_systematic_draws_and_other_divergences_are_sent_to_topk(tiny_lm, tmp_path):
    """The default follows the size-quality curve (benchmarks/cache.md); sampled targets are for forward KL only,
    and a recipe with another divergence is told to choose top-k before anything is built."""
    from distil.errors import ConfigError

    recipe = cache_recipe(tiny_lm, tmp_path)
    del recipe["teacher"]["cache"]["mode"], recipe["teacher"]["cache"]["k"]
    spec = validate_recipe(recipe).teacher.cache
    assert (spec.mode, spec.num_draws, spec.sampling) == ("sample", 32, "systematic")
    recipe["loss"]["divergence"] = "reverse_kl"
    with pytest.raises(ConfigError, match="for reverse_kl set teacher.cache.mode=topk"):
        validate_recipe(recipe)
    recipe["teacher"]["cache"]["mode"] = "topk"
    assert validate_recipe(recipe).teacher.cache.mode == "topk"
