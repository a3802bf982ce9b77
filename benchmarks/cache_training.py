"""Training-step time fed by an offline teacher cache vs a live teacher vs plain cross-entropy.

The flagship setting: SmolLM2-135M-Instruct teacher, a 10-layer student built from it (frozen embeddings), batches
of 4 x 64 tokens of Shakespeare, bf16 autocast (or fp32), fused AdamW. One process; the kinds of step are interleaved
round by round so that machine noise hits them alike; medians and ratios are reported. `cached_kd` is the fused
cache-fed loss (distil.losses.fused_linear_cached_kd_and_ce), `cached_kd_plain` the plain one (full logits).

    python benchmarks/cache_training.py --rounds 8 [--precision fp32] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distil.cache import TeacherCache
from distil.config.load import load_recipe
from distil.data.sources.text import lm_batch, load_corpus
from distil.distill.lm import CausalLMObjective
from distil.distill.pair import Teacher
from distil.measure.machine import cpu_model
from distil.models import hf
from distil.distill.cached import CachedLMObjective
from distil.tasks import causal_lm_cache as cached
from distil.students import make_student
from distil.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=256, help="training blocks put in the cache")
    parser.add_argument("--cache", help="cache folder (built if missing); default: a temporary folder")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: autocast and a bf16 teacher (the flagship's default); fp32: neither")
    parser.add_argument("--batch", type=int, default=4, help="blocks of 64 tokens per step")
    args = parser.parse_args()
    hf.quiet_transformers()
    folder = Path(args.cache or tempfile.mkdtemp(prefix="distil-cache-bench-"))
    recipe = load_recipe("smollm2-distil", [f"data.max_train_tokens={args.blocks * 64}",
                                            f"teacher.cache.path={folder}"])
    teacher, tokenizer = hf.load_causal_lm(recipe.teacher.model.source, dtype="float32")
    student = make_student(teacher, num_layers=10).train()
    for head in (student.get_input_embeddings(), student.get_output_embeddings()):
        head.weight.requires_grad_(False)
    bf16 = args.precision == "bf16"
    teacher = (teacher.to(torch.bfloat16) if bf16 else teacher).eval()
    corpus = load_corpus(recipe.data, tokenizer)
    start = time.perf_counter()
    if not (folder / cached.MANIFEST).exists():
        cached.build_for_recipe(recipe, teacher, tokenizer, corpus, show_progress=False)
    build_s = time.perf_counter() - start
    cache = TeacherCache(folder)
    cpu, vocab = torch.device("cpu"), teacher.config.vocab_size
    objectives = {
        "ce": CausalLMObjective(student, None, recipe.loss, vocab_size=vocab, device=cpu),
        "live_kd": CausalLMObjective(student, Teacher(teacher), recipe.loss, vocab_size=vocab, device=cpu),
        "cached_kd": CachedLMObjective(student, cache, recipe.loss, device=cpu),
        "cached_kd_plain": CachedLMObjective(student, cache, recipe.loss.model_copy(update={"fused": False}),
                                             device=cpu),
    }
    optimizer = build_optimizer(recipe.train, [p for p in student.parameters() if p.requires_grad])
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for r in range(args.rounds + 1):
        indices = torch.arange(args.batch * r, args.batch * (r + 1)) % len(corpus.train)
        batch = {"id": indices, **lm_batch(corpus.train[indices])}
        for name, objective in objectives.items():
            begin = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                terms = objective.loss(batch)
            terms["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - begin)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"rounds": args.rounds, "precision": args.precision, "batch": f"{args.batch} x 64",
              "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "median_step_s": medians,
              "ratio_to_ce": {name: m / medians["ce"] for name, m in medians.items()},
              "cache_build_s": build_s, "cache_blocks": len(corpus.train) + len(corpus.eval),
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
