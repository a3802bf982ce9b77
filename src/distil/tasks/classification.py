"""Task classification: train (or reuse) a teacher, then train the same student alone and distilled, and compare.

The arms and their objectives are in distil.tasks.classification_arms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.config.adapt import logit_loss
from distil.config.schema import SELF_DISTILL_ARMS, Recipe
from distil.data.sources import LoadedData, data_problems, load_data
from distil.data.sources.base import ClassificationData, take
from distil.distill.objectives import to_device
from distil.distill.pair import Teacher, check_pair
from distil.errors import DistilError
from distil.measure.classification import classification_scores
from distil.measure.cost import folder_size, measure_latency, measure_peak_memory, measure_throughput, parameter_count
from distil.models.vision import build_classifier
from distil.tasks.artifacts import arm_folder, is_model_folder
from distil.tasks.base import RunContext, data_and_model_rules, not_causal_lm_rules
from distil.tasks.classification_estimate import estimate_classification
from distil.tasks.classification_arms import (preflight_variants, teacher_folder, teacher_specs, train_arm,
                                              train_classifier, training_rows)
from distil.tasks.classification_models import (HF_ARCHS, HF_DATA_KINDS, build_model, load_model, reads_text,
                                                save_model, uses_hf)
from distil.tasks.hf_models import source_problems
from distil.train import distributed
from distil.train.seed import seed_everything

THROUGHPUT_BATCH = 256  # the larger batch at which throughput and peak inference memory are measured
TEXT_THROUGHPUT_BATCH = 32  # the same for text classifiers (a transformer's batch of 256 texts takes tens of seconds)
TEXT_EVAL_BATCH = 32
DATA_KINDS = ("vision", "table", "images", "texts")


class ClassificationTask:
    name = "classification"
    estimate = staticmethod(estimate_classification)

    def rules(self, recipe: Recipe) -> list[str]:
        found = data_and_model_rules(recipe, DATA_KINDS, ("mlp", "cnn", *HF_ARCHS)) + not_causal_lm_rules(recipe)
        text = reads_text(recipe)
        for who, model in (("teacher", recipe.teacher.model), ("student", recipe.student.model)):
            if text and model.arch in ("mlp", "cnn"):
                found.append(f"{who}.model.arch {model.arch} reads tensors; texts need arch: hf (a Hugging Face "
                             "encoder) or, for the student, from_teacher")
            if recipe.data.kind not in HF_DATA_KINDS and model.arch in HF_ARCHS:
                found.append(f"{who}.model.arch {model.arch} is for texts and image folders (data.kind: texts or "
                             f"images); data.kind {recipe.data.kind} uses mlp or cnn")
        if recipe.student.model.arch == "from_teacher" and recipe.teacher.model.arch != "hf":
            found.append("student.model.arch from_teacher needs a Hugging Face teacher (teacher.model.arch: hf)")
        if recipe.student.freeze_embeddings and not text:
            found.append("student.freeze_embeddings keeps token embeddings fixed; it is for texts (data.kind: texts)")
        if uses_hf(recipe) and any(arm in SELF_DISTILL_ARMS for arm in recipe.arms):
            found.append(f"arms {[a for a in recipe.arms if a in SELF_DISTILL_ARMS]} are for the built-in MLP/CNN "
                         "classifiers; Hugging Face classifiers have student_alone, logit_kd and distilled")
        labelled = any(spec is not None and spec.labelled is not None for spec in (recipe.train, recipe.teacher.train))
        if labelled and recipe.loss.divergence == "dkd":
            found.append("loss.divergence dkd needs every row's label; with train.labelled use forward_kl (or "
                         "another divergence)")
        return found

    def problems(self, recipe: Recipe) -> list[str]:
        found = data_problems(recipe.data) + (source_problems(recipe) if uses_hf(recipe) else [])
        for i, spec in enumerate(teacher_specs(recipe)):
            key = "teacher" if i == 0 else f"multi_teacher.teachers[{i - 1}]"
            folder = teacher_folder(recipe, spec)
            if not is_model_folder(folder) and spec.train is None:
                where = f"{key}.checkpoint" if spec.checkpoint else "the teacher cache"
                found.append(f"{key}: no weights in {where} ({folder}) and no {key}.train budget to train them; "
                             f"set {key}.checkpoint=DIR or add {key}.train")
        return found

    def deep_problems(self, recipe: Recipe) -> list[str]:
        try:
            preflight(recipe, load_data(recipe.data, seed=recipe.seed).corpus)
        except DistilError as exc:
            return [str(exc)]
        return []

    def start(self, ctx: RunContext) -> ClassificationRun:
        recipe = ctx.recipe
        loaded = load_data(recipe.data, seed=recipe.seed)
        data = loaded.corpus
        preflight(recipe, data)
        # The teacher stage: teachers are reused when an earlier run (of any recipe with the same teacher and data)
        # trained them.
        teachers, folders = [], []
        for index, spec in enumerate(teacher_specs(recipe)):
            folder = teacher_folder(recipe, spec)
            name = "teacher" if index == 0 else f"teacher{index}"
            if not is_model_folder(folder):
                what = getattr(spec.model, "source", spec.model.arch)
                ctx.console.print(f"[bold]{name}[/bold]: training {what} (weights go to {folder})")
                t_recipe = recipe if spec.seed is None else recipe.model_copy(update={"seed": spec.seed})
                seed_everything(t_recipe.seed)
                model = build_model(spec.model, data, recipe)[0].to(ctx.device)
                assert spec.train is not None  # guaranteed by problems()
                seconds = train_classifier(name, model, None, logit_loss(recipe.loss), spec.train, loaded, t_recipe,
                                           ctx)
                save_model(folder, model, spec.model, data, {"train_time_s": seconds})
            else:
                ctx.console.print(f"[bold]{name}[/bold]: reusing {folder}")
            teachers.append(load_model(folder, recipe).to(ctx.device))
            folders.append(folder)
        return ClassificationRun(ctx, loaded, teachers, folders)


class ClassificationRun:
    metrics = ["accuracy", "macro_f1"]

    def __init__(self, ctx: RunContext, data: LoadedData, teachers: list[nn.Module], folders: list[Path]):
        self.ctx, self.data, self.teachers, self.folders = ctx, data, teachers, folders

    def train_arm(self, arm: str, folder: Path) -> None:
        train_arm(arm, folder, self.data, self.teachers, self.ctx)

    def measure(self) -> dict[str, dict[str, Any]]:
        rows = {}
        device = self.ctx.device
        for index, (model, folder) in enumerate(zip(self.teachers, self.folders)):
            if distributed.is_sharded(model):
                model = load_model(folder, self.ctx.recipe).to(device)
            rows["teacher" if index == 0 else f"teacher{index}"] = self._measure(model, folder)
        for arm in self.ctx.recipe.arms:
            folder = arm_folder(self.ctx.run_dir, arm)
            rows[arm] = self._measure(load_model(folder, self.ctx.recipe).to(device), folder)
        return rows

    def _measure(self, model: nn.Module, folder: Path) -> dict[str, Any]:
        recipe, device = self.ctx.recipe, self.ctx.device
        model.eval()
        test_x, test_y = self.data.eval
        text = reads_text(recipe)
        example = to_device(take(test_x, torch.arange(1)), device)
        batch = to_device(take(test_x, torch.arange(min(TEXT_THROUGHPUT_BATCH if text else THROUGHPUT_BATCH,
                                                            len(test_y)))), device)
        info_file = folder / "train.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        scores = classification_scores(model, test_x, test_y, device, self.data.corpus.num_classes,
                                       batch=TEXT_EVAL_BATCH if text else 1000)
        return {
            **scores,
            "params": parameter_count(model),
            "size_bytes": folder_size(folder / "model.safetensors"),
            "latency_ms": measure_latency(lambda: model(example), runs=recipe.latency_runs),
            f"samples_per_s_b{len(batch)}": measure_throughput(lambda: model(batch), len(batch),
                                                               runs=recipe.latency_runs),
            "peak_memory_bytes": measure_peak_memory(model, lambda: model(batch), device),
            "peak_memory_batch": len(batch),
            "train_time_s": info.get("train_time_s"),
            "path": str(folder),
            **info.get("report", {}),  # per-exit, per-generation, EMA accuracies of self-distillation arms
        }

    def summary_fields(self) -> dict[str, Any]:
        names = self.data.corpus.label_names
        return {"labels": names} if names else {}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        return summary


def preflight(recipe: Recipe, data: ClassificationData) -> None:
    """Budgets against the data, then the pair built untrained and checked on one example, before any training."""
    for spec, name in ((recipe.train, "train"), (recipe.teacher.train, "teacher.train")):
        if spec is None:
            continue
        rows = int(training_rows(data.train_y, spec, recipe.seed, transfer=False)[0].numel())
        if rows < spec.batch_size:
            partly = spec.labelled is not None or bool((data.train_y < 0).any())
            what, more = ("labelled training examples", f"{name}.labelled") if partly else ("training examples",
                                                                                          f"{name}.subset")
            raise DistilError(f"{name}.batch_size ({spec.batch_size}) exceeds the {rows} {what}; lower "
                              f"{name}.batch_size or raise {more}")
    if uses_hf(recipe):
        return  # a Hugging Face model is checked when it loads (labels, heads, input shape); a load costs seconds
    # On the meta device: shapes are checked without allocating (or initialising) any weight.
    with torch.device("meta"):
        student = build_classifier(recipe.student.model, data.input_shape, data.num_classes)
        teacher = build_classifier(recipe.teacher.model, data.input_shape, data.num_classes)
        teachers = [build_classifier(spec.model, data.input_shape, data.num_classes) for spec in teacher_specs(recipe)]
    check_pair(student, Teacher(teacher), (data.train_x[:2].to("meta"),))
    preflight_variants(recipe, data, student, teachers, data.train_x[:2].to("meta"))


CLASSIFICATION = ClassificationTask()
