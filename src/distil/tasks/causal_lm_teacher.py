"""The causal_lm teacher stage: a teacher fine-tuned on the training data before it teaches (`teacher.train`).

A pretrained teacher need not know the task's format any better than the student: Qwen2.5-Coder-1.5B predicts
HumanEval's reference solutions barely better than the 0.5B (perplexity 2.34 vs 2.44), so its soft targets pull the
student away from them. Task-specific distillation (DistilBERT's, GKD's) first fine-tunes the teacher on the task.
The tuned teacher is a plain model folder in `$DISTIL_CACHE/teachers/`, keyed by everything that shapes it, so later
runs (other students, other arms) reuse it.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from distil.config.adapt import logit_loss, lora, train_config
from distil.config.schema import HFModelSpec, Recipe
from distil.data.sources import LoadedData
from distil.data.stream import BatchStream
from distil.distill.lm import CausalLMObjective
from distil.measure.lm import perplexity_and_predictions
from distil.models.lora import AdaptersOnly, merged, with_lora
from distil.paths import cache_dir
from distil.remembered import model_files_key
from distil.tasks.artifacts import is_model_folder
from distil.tasks.base import RunContext
from distil.tasks.hf_models import save_hf_folder
from distil.train.loop import Stage, train
from distil.train.seed import seed_everything


def teacher_rules(recipe: Recipe) -> list[str]:
    spec = recipe.teacher
    found = []
    if spec.lora is not None and spec.train is None:
        found.append("teacher.lora is the teacher stage's adapters: add teacher.train (its budget), or remove it")
    if spec.train is None:
        return found
    if spec.checkpoint is not None:
        found.append("task causal_lm: teacher.checkpoint is not read; point teacher.model.source at a tuned folder, or "
                     "keep teacher.train to fine-tune it here")
    if spec.cache is not None:
        found.append("teacher.train with teacher.cache: build the cache from the tuned teacher's folder instead "
                     "(teacher.model.source)")
    if spec.lora is not None and recipe.distributed.strategy == "fsdp":
        found.append("teacher.lora is not supported with distributed.strategy fsdp (use ddp)")
    return found


def tuned_teacher_folder(recipe: Recipe, source: Path) -> Path:
    """Where the teacher fine-tuned by this recipe's teacher stage lives, keyed by its source files, the data, the
    stage's budget and adapters, and the seed."""
    spec = recipe.teacher
    seed = recipe.seed if spec.seed is None else spec.seed
    what = [model_files_key(source), recipe.data.model_dump(mode="json"), spec.train.model_dump(mode="json"),  # type: ignore[union-attr]
            spec.lora.model_dump(mode="json") if spec.lora else None, seed, recipe.loss.fused]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "teachers" / f"{source.name}-tuned-{digest}"


def tune_teacher(ctx: RunContext, teacher: Any, tokenizer: Any, loaded: LoadedData, eval_batches: list,
                 folder: Path) -> None:
    """Fine-tune `teacher` (fp32 weights, on the run's device, in the stage's precision) on the training data with
    cross-entropy and save it (adapters merged) into `folder`; an interrupted stage resumes from its checkpoints in
    the run directory."""
    recipe = ctx.recipe
    spec = recipe.teacher
    assert spec.train is not None
    seed = recipe.seed if spec.seed is None else spec.seed
    seed_everything(seed)
    model = teacher.float().to(ctx.device)
    model.config.use_cache = False
    wrapper = with_lora(model, lora(spec.lora)) if spec.lora is not None else None
    if wrapper is not None:
        trained, total = wrapper.get_nb_trainable_parameters()
        ctx.console.print(f"teacher: LoRA adapters, {trained:,} trained parameters of {total:,}")
    objective = CausalLMObjective(model, None, logit_loss(recipe.loss), vocab_size=model.config.vocab_size,
                                  device=ctx.device, pad_token_id=tokenizer.pad_token_id)
    if wrapper is not None:
        objective.modules["student"] = AdaptersOnly(model)  # checkpoints hold the adapters alone
    quick_eval = eval_batches[:2]
    stage = Stage("teacher", objective, BatchStream(loaded.size, spec.train.batch_size, loaded.collate, seed=seed),
                  train_config(spec.train), ctx.run_dir / "checkpoints" / "teacher", ctx.metrics, ctx.device,
                  recipe=recipe.model_dump(mode="json"),
                  evaluate=lambda: {"perplexity": perplexity_and_predictions(model, quick_eval,
                                                                             vocab_size=model.config.vocab_size)[0]})
    train(stage, show_progress=ctx.show_progress)
    seconds = stage.elapsed_s
    del stage, objective
    gc.collect()  # a teacher is the largest model of the run: nothing of its training should outlive it
    model.config.use_cache = True
    tuned = merged(wrapper) if wrapper is not None else model
    # Shards of at most 1 GB: safetensors builds a file's bytes in memory before writing it.
    save_hf_folder(folder, tuned.to(torch.device("cpu")), tokenizer,
                   {"train_time_s": seconds, "steps": spec.train.steps, "tuned_from": str(_source(recipe))},
                   max_shard_size="1GB")


def _source(recipe: Recipe) -> str:
    assert isinstance(recipe.teacher.model, HFModelSpec)
    return recipe.teacher.model.source


def reuse_or_tune(ctx: RunContext, source: Path, load: Any, tokenizer: Any, loaded: LoadedData,
                  eval_batches: list) -> Path:
    """The tuned teacher's folder: reused when an earlier run made it, else trained now from `load()`."""
    folder = tuned_teacher_folder(ctx.recipe, source)
    if is_model_folder(folder):
        ctx.console.print(f"[bold]teacher[/bold]: reusing the fine-tuned teacher {folder}")
        return folder
    ctx.console.print(f"[bold]teacher[/bold]: fine-tuning {_source(ctx.recipe)} on the training data "
                      f"({ctx.recipe.teacher.train.steps} steps; weights go to {folder})")  # type: ignore[union-attr]
    tune_teacher(ctx, load(), tokenizer, loaded, eval_batches, folder)
    return folder
