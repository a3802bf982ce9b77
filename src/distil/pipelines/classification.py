"""The classic recipe: train (or reuse) a teacher, then train the same student alone and distilled, and compare."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distil.config.schema import LossSpec, Recipe, TeacherSpec, TrainSpec
from distil.data.stream import BatchStream
from distil.data.vision import ClassificationData, load_vision, vision_problems
from distil.distill.objectives import ClassifierObjective
from distil.distill.pair import Teacher, check_pair
from distil.errors import DistilError
from distil.models.vision import build_classifier, classifier_config, load_classifier
from distil.diskspace import tensor_bytes, write_folder
from distil.paths import cache_dir
from distil.report import (folder_size, measure_latency, measure_peak_memory, measure_throughput, parameter_count,
                           print_summary, write_summary)
from distil.reporting import build_report
from distil.train import distributed
from distil.train.checkpoint import save_tensors, write_json
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog
from distil.train.seed import seed_everything

ARM_FOLDERS = {"distilled": "student", "student_alone": "student_alone", "logit_kd": "logit_kd",
               "born_again": "born_again", "deep_supervision": "deep_supervision", "ema": "ema"}
THROUGHPUT_BATCH = 256  # the larger batch at which throughput and peak inference memory are measured


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DistilError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    return distributed.device_for("cuda" if name in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def problems(recipe: Recipe) -> list[str]:
    """Pre-flight checks that need no data loaded and no model built."""
    from distil.pipelines.variants import teacher_specs

    found = vision_problems(recipe.data.name, recipe.data.path)
    for i, spec in enumerate(teacher_specs(recipe)):
        key = "teacher" if i == 0 else f"multi_teacher.teachers[{i - 1}]"
        folder = teacher_folder(recipe, spec)
        if not _is_model_folder(folder) and spec.train is None:
            where = f"{key}.checkpoint" if spec.checkpoint else "the teacher cache"
            found.append(f"{key}: no weights in {where} ({folder}) and no {key}.train budget to train them; "
                         f"set {key}.checkpoint=DIR or add {key}.train")
    return found


def deep_problems(recipe: Recipe) -> list[str]:
    try:
        preflight(recipe, load_vision(recipe.data.name, recipe.data.path, recipe.seed))
    except DistilError as exc:
        return [str(exc)]
    return []


def preflight(recipe: Recipe, data: ClassificationData) -> None:
    """Build the pair untrained and check it on one example, before any training."""
    for spec, name in ((recipe.train, "train"), (recipe.teacher.train, "teacher.train")):
        if spec is None:
            continue
        available = min(spec.subset or len(data.train_y), len(data.train_y))
        if available < spec.batch_size:
            raise DistilError(f"{name}.batch_size ({spec.batch_size}) exceeds the {available} training examples; "
                              f"lower {name}.batch_size or raise {name}.subset")
    from distil.pipelines.variants import preflight_variants, teacher_specs

    # On the meta device: shapes are checked without allocating (or initialising) any weight.
    with torch.device("meta"):
        student = build_classifier(recipe.student.model, data.input_shape, data.num_classes)
        teacher = build_classifier(recipe.teacher.model, data.input_shape, data.num_classes)
        teachers = [build_classifier(spec.model, data.input_shape, data.num_classes) for spec in teacher_specs(recipe)]
    check_pair(student, Teacher(teacher), (data.train_x[:2].to("meta"),))
    preflight_variants(recipe, data, student, teachers, data.train_x[:2].to("meta"))


def teacher_folder(recipe: Recipe, spec: TeacherSpec | None = None) -> Path:
    """Where a teacher's weights live: its `checkpoint`, or a cache folder keyed by everything that shapes them."""
    spec = spec or recipe.teacher
    if spec.checkpoint:
        return Path(spec.checkpoint).expanduser()
    dumped = spec.model_dump(mode="json")
    if dumped.get("seed") is None:  # keys written before teachers had a seed of their own stay valid
        dumped.pop("seed", None)
    seed = recipe.seed if spec.seed is None else spec.seed
    key = json.dumps([recipe.data.model_dump(mode="json"), dumped, seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "teachers" / f"{recipe.data.name}-{spec.model.arch}-{digest}"


def _is_model_folder(folder: Path) -> bool:
    """Whether the folder holds a model; with several processes, rank 0's answer (all must branch alike)."""
    return distributed.agree((folder / "model.safetensors").is_file() and (folder / "config.json").is_file())


def save_model_folder(folder: Path, model: nn.Module, config: dict[str, Any], info: dict[str, Any]) -> None:
    """Write weights + config (+ training info) to a temporary folder, then move it into place (rank 0 only; under
    FSDP every process first helps gather the weights)."""
    weights = distributed.full_state_dict(model)

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", weights)
        write_json(tmp / "config.json", config)
        write_json(tmp / "train.json", info)

    distributed.on_main(lambda: write_folder(folder, fill, tensor_bytes(weights.values(), files=3)))


def subset_indices(total: int, subset: int | None, seed: int) -> torch.Tensor:
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[: subset or total]


def _train_classifier(
    name: str, model: nn.Module, teacher: Teacher | None, loss: LossSpec, spec: TrainSpec, data: ClassificationData,
    recipe: Recipe, run_dir: Path, metrics: MetricsLog, device: torch.device, show_progress: bool,
    objective: Any = None,
) -> float:
    """Train one arm (or the teacher); returns the seconds its training took, summed over resumed runs (the work a
    killed run did after its last checkpoint is redone and counted once).

    `objective` replaces the default ClassifierObjective(model, teacher, loss) (variants: features, EMA, exits)."""
    indices = subset_indices(len(data.train_y), spec.subset, recipe.seed)
    x, y = data.train_x[indices], data.train_y[indices]
    stream = BatchStream(len(y), spec.batch_size, lambda i: (x[i], y[i]), seed=recipe.seed)
    test_x, test_y = _eval_split(recipe, data)
    objective = objective or ClassifierObjective(model, teacher, loss, device)
    stage = Stage(name, objective, stream, spec, run_dir / "checkpoints" / name, metrics, device,
                  evaluate=lambda: {"accuracy": accuracy(model, test_x, test_y, device)},
                  recipe=recipe.model_dump(mode="json"))
    train(stage, show_progress=show_progress)
    return stage.elapsed_s


def _eval_split(recipe: Recipe, data: ClassificationData) -> tuple[torch.Tensor, torch.Tensor]:
    n = recipe.data.eval_size or len(data.test_y)
    return data.test_x[:n], data.test_y[:n]


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch].to(device)).argmax(-1).cpu() == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / len(y)


def _measure(model: nn.Module, folder: Path, recipe: Recipe, data: ClassificationData, device: torch.device) -> dict:
    model.eval()
    test_x, test_y = _eval_split(recipe, data)
    example = test_x[:1].to(device)
    batch = test_x[:THROUGHPUT_BATCH].to(device)
    info_file = folder / "train.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    return {
        "accuracy": accuracy(model, test_x, test_y, device),
        "params": parameter_count(model),
        "size_bytes": folder_size(folder / "model.safetensors"),
        "latency_ms": measure_latency(lambda: model(example), runs=recipe.latency_runs),
        f"samples_per_s_b{len(batch)}": measure_throughput(lambda: model(batch), len(batch), runs=recipe.latency_runs),
        "peak_memory_bytes": measure_peak_memory(model, lambda: model(batch), device),
        "peak_memory_batch": len(batch),
        "train_time_s": info.get("train_time_s"),
        "path": str(folder),
        **info.get("report", {}),  # per-exit, per-generation, EMA accuracies of self-distillation arms
    }


def run(recipe: Recipe, run_dir: Path, *, show_progress: bool = True, console: Console | None = None) -> dict:
    console = console or Console()
    device = pick_device(recipe.train.device)
    found = problems(recipe)
    if found:
        raise DistilError(found[0])
    data = load_vision(recipe.data.name, recipe.data.path, recipe.seed)
    preflight(recipe, data)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    config = lambda spec: classifier_config(spec, data.input_shape, data.num_classes)  # noqa: E731

    # Stage 1: the teachers, reused when an earlier run (of any recipe with the same teacher and data) trained them.
    from distil.pipelines.variants import print_extras, teacher_specs, train_arm

    teachers, t_folders = [], []
    for index, spec in enumerate(teacher_specs(recipe)):
        t_folder = teacher_folder(recipe, spec)
        name = "teacher" if index == 0 else f"teacher{index}"
        if not _is_model_folder(t_folder):
            console.print(f"[bold]{name}[/bold]: training {spec.model.arch} (weights go to {t_folder})")
            t_recipe = recipe if spec.seed is None else recipe.model_copy(update={"seed": spec.seed})
            seed_everything(t_recipe.seed)
            model = build_classifier(spec.model, data.input_shape, data.num_classes).to(device)
            assert spec.train is not None  # guaranteed by problems()
            seconds = _train_classifier(name, model, None, recipe.loss, spec.train, data, t_recipe, run_dir,
                                        metrics, device, show_progress)
            save_model_folder(t_folder, model, config(spec.model), {"train_time_s": seconds})
        else:
            console.print(f"[bold]{name}[/bold]: reusing {t_folder}")
        teachers.append(load_classifier(t_folder).to(device))
        t_folders.append(t_folder)

    # Stage 2: each arm trains the same student (same seed, same data order, same budget).
    for arm in recipe.arms:
        train_arm(arm, recipe, data, teachers, run_dir, metrics, device, show_progress, console)

    if not distributed.is_main():  # the report is rank 0's, from the saved folders
        return {}
    arms = {}
    for index, (teacher_model, t_folder) in enumerate(zip(teachers, t_folders)):
        if distributed.is_sharded(teacher_model):
            teacher_model = load_classifier(t_folder).to(device)
        arms["teacher" if index == 0 else f"teacher{index}"] = _measure(teacher_model, t_folder, recipe, data, device)
    for arm in recipe.arms:
        folder = run_dir / ARM_FOLDERS[arm]
        arms[arm] = _measure(load_classifier(folder).to(device), folder, recipe, data, device)
    metrics.close()
    summary = write_summary(run_dir, {
        "recipe": recipe.name, "task": recipe.task, "metrics": ["accuracy"], "arms": arms,
        "device": str(device), "torch_threads": torch.get_num_threads(),
    })
    print_summary(summary, console)
    print_extras(summary, console)
    report = build_report(run_dir)
    console.print(f"report: {report}")
    return summary
