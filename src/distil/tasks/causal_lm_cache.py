"""Causal-LM distillation from an offline teacher cache: build it once, then train students without the teacher.

The cache holds every training block (sample id = block index) and every held-out block (id EVAL_ID_OFFSET + j),
so held-out agreement needs no teacher either. The teacher's own evaluation (perplexity, speed, size) and its held-out
top-1 predictions are measured when the cache is built and kept beside it (`teacher_eval.json`, `teacher_top1.json`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from rich.console import Console

from distil.cache import BuildResult, TeacherCache, build_cache, dataset_fingerprint, tokenizer_hash, weights_hash
from distil.cache.build import finalize_cache
from distil.config.schema import Recipe
from distil.data.sources.text import TextCorpus
from distil.errors import DistilError
from distil.train import distributed
from distil.train.checkpoint import write_json

EVAL_ID_OFFSET = 1_000_000_000
TEACHER_EVAL = "teacher_eval.json"
TEACHER_TOP1 = "teacher_top1.json"  # the teacher's held-out top-1 predictions (a sampled cache cannot give them)
MANIFEST = "manifest.json"


def cache_is_complete(path: Path) -> bool:
    """Whether the cache is built; with several processes, rank 0's answer (all must branch alike)."""
    return distributed.agree((Path(path) / MANIFEST).is_file() and (Path(path) / TEACHER_EVAL).is_file())


def cache_samples(corpus: TextCorpus) -> list[dict[str, Any]]:
    """Training blocks, then held-out blocks; labels = input ids, so each position's target is the next token's."""
    train = [{"id": i, "input_ids": b, "labels": b} for i, b in enumerate(corpus.train)]
    held_out = [{"id": EVAL_ID_OFFSET + j, "input_ids": b, "labels": b} for j, b in enumerate(corpus.eval)]
    return train + held_out


def build_for_recipe(recipe: Recipe, teacher: nn.Module, tokenizer: Any, corpus: TextCorpus, *,
                     shard: tuple[int, int] | None = None, show_progress: bool = True) -> BuildResult:
    """Run the teacher once over the recipe's training and held-out text (part `shard` of a split build).

    Without `shard`, each process of a torchrun job computes its own part (rank of world size); the manifest is
    written by rank 0 after all parts finished, so it never describes a partial cache."""
    if shard is None and distributed.active():
        result = _build(recipe, teacher, tokenizer, corpus, (distributed.rank(), distributed.world_size()),
                        show_progress)
        distributed.barrier()  # every part's shards are on disk
        manifest = distributed.on_main(finalize_cache, result.path)  # idempotent: the last part may have written it
        return dataclasses.replace(result, complete=True, manifest=manifest)
    return _build(recipe, teacher, tokenizer, corpus, shard or (0, 1), show_progress)


def _build(recipe: Recipe, teacher: nn.Module, tokenizer: Any, corpus: TextCorpus, shard: tuple[int, int],
           show_progress: bool) -> BuildResult:
    spec = recipe.teacher.cache
    assert spec is not None
    device = next(teacher.parameters()).device
    vocab = teacher.config.vocab_size

    @torch.no_grad()
    def teacher_logits(batch: dict[str, Any]) -> torch.Tensor:
        out = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
        return out.logits[..., :vocab].float()

    samples = cache_samples(corpus)
    fields = {
        "teacher": recipe.teacher.model.source,  # type: ignore[union-attr]
        "teacher_hash": weights_hash(teacher.state_dict()),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(samples),
        "seq_len": recipe.data.seq_len,
    }
    return build_cache(
        spec.path, samples, teacher_logits, mode=spec.mode, k=spec.k, num_draws=spec.num_draws,
        sampling=spec.sampling,
        temperature=recipe.loss.temperature, manifest_fields=fields, shard_size=spec.shard_size, shard=shard,
        batch_size=spec.batch_size, seed=recipe.seed, progress=show_progress,
    )


def write_teacher_eval(path: Path, row: dict[str, Any], predictions: torch.Tensor) -> None:
    """The teacher's summary row and held-out top-1 predictions; the row last, as it marks the cache complete."""
    write_json(Path(path) / TEACHER_TOP1, {"top1": predictions.flatten().tolist()})
    write_json(Path(path) / TEACHER_EVAL, row)


def read_teacher_eval(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / TEACHER_EVAL).read_text())


def open_cache(recipe: Recipe, tokenizer: Any, corpus: TextCorpus) -> TeacherCache:
    """Open the recipe's cache and refuse it when it was built for other text, tokenizer, length or temperature."""
    spec = recipe.teacher.cache
    assert spec is not None
    cache = TeacherCache(spec.path)
    cache.check_compatible(
        tokenizer_hash=tokenizer_hash(tokenizer), dataset_fingerprint=dataset_fingerprint(cache_samples(corpus)),
        seq_len=recipe.data.seq_len, temperature=recipe.loss.temperature, mode=spec.mode,
        k=spec.k if spec.mode == "topk" else None, num_draws=spec.num_draws if spec.mode == "sample" else None,
        sampling=spec.sampling if spec.mode == "sample" else None,
    )
    return cache


def eval_predictions(cache: TeacherCache, num_blocks: int, seq_len: int) -> torch.Tensor:
    """The teacher's top-1 next token at every held-out position (flat), as measured when the cache was built, or
    read from a top-k cache's first ids (caches built before the predictions were kept)."""
    kept = cache.root / TEACHER_TOP1
    if kept.is_file():
        return torch.tensor(json.loads(kept.read_text())["top1"], dtype=torch.long)
    if cache.mode != "topk":
        raise DistilError(f"the sampled cache {cache.root} predates the teacher's held-out predictions that held-out "
                          f"agreement needs: delete {cache.root / TEACHER_EVAL} and run again (the shards are kept; "
                          "the teacher is measured once more)")
    ids = torch.arange(EVAL_ID_OFFSET, EVAL_ID_OFFSET + num_blocks)
    return cache.targets(ids, seq_len)["ids"][:, :-1, 0].flatten()


def describe(result: BuildResult, console: Console) -> None:
    state = "complete" if result.complete else "waiting for other parts"
    console.print(f"teacher cache {result.path}: {result.shards_written} shards written, {result.shards_skipped} "
                  f"already there or another part's, {result.positions_written:,} positions in "
                  f"{result.seconds:.1f} s ({state})")
