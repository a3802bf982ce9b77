"""The arms of a classification recipe beyond the student alone: logit KD, the recipe's full distillation (feature
terms, several teachers), and self-distillation (born-again generations, mean teacher, deep supervision).

Every arm trains the same student architecture from the same seed, on the same data order and budget
(`recipe.train`); the born-again arm spends that budget once per generation. What each arm learns from:

    student_alone     hard labels
    logit_kd          the teacher's logits (loss.divergence / alpha / temperature), teacher 0 only
    distilled         the recipe's whole loss: the logit term (from every teacher of multi_teacher) + loss.features
    born_again        generation k learns the logit term from generation k-1; generation 0 is the student alone
    ema               the logit term from an exponential moving average of its own weights
    deep_supervision  exits on shallower blocks learn from the deepest classifier (BYOT)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distil.config.schema import TEACHER_ARMS, Recipe, TeacherSpec
from distil.data.vision import ClassificationData
from distil.distill.feature_objective import FeatureDistiller, FeatureObjective
from distil.distill.multi_teacher import MultiTeacherObjective, TeacherMixture
from distil.distill.objectives import ClassifierObjective
from distil.distill.pair import Teacher, check_pair
from distil.distill.self_distill import DeepSupervisionObjective, EMAObjective, born_again_loss
from distil.models.exits import build_exits, exit_accuracies
from distil.models.vision import build_classifier, classifier_config, load_classifier
from distil.train.metrics import MetricsLog
from distil.train.seed import seed_everything


def teacher_specs(recipe: Recipe) -> list[TeacherSpec]:
    """The teachers the recipe's arms need: none for self-distillation alone; teacher 0, then multi_teacher's."""
    if not any(arm in TEACHER_ARMS for arm in recipe.arms):
        return []
    extra = recipe.multi_teacher.teachers if recipe.multi_teacher and "distilled" in recipe.arms else []
    return [recipe.teacher, *extra]


def feature_distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module, example: torch.Tensor
                      ) -> FeatureDistiller:
    distiller = FeatureDistiller(recipe.loss.features, student, teacher)
    distiller.build(lambda: student(example), lambda: teacher(example), seed=recipe.seed)
    return distiller


def preflight_variants(recipe: Recipe, data: ClassificationData, student: nn.Module, teachers: list[nn.Module],
                       example: torch.Tensor) -> None:
    """Pre-flight of the arms: every teacher pairs with the student, feature terms resolve and their shapes agree
    (wrong module names fail here with close matches), exits can be attached. Works on the meta device too."""
    param = next(student.parameters(), None)
    example = example.to(param.device) if param is not None else example
    for teacher in teachers[1:]:
        check_pair(student, Teacher(teacher), (example,))
    if recipe.loss.features and teachers:
        feature_distiller(recipe, student, teachers[0], example)
    if "deep_supervision" in recipe.arms:
        build_exits(student, example, data.num_classes, recipe.self_distill.deep_supervision.exits)


def _distilled_objective(recipe: Recipe, model: nn.Module, teachers: list[nn.Module], example: torch.Tensor,
                         device: torch.device, console: Console) -> Any:
    loss, multi = recipe.loss, recipe.multi_teacher
    if multi is None:
        objective: Any = ClassifierObjective(model, Teacher(teachers[0]), loss, device)
    elif multi.combine == "mixture":
        objective = ClassifierObjective(model, Teacher(TeacherMixture(teachers, multi.weights, loss.temperature)),
                                        loss, device)
    else:
        objective = MultiTeacherObjective(model, [Teacher(t) for t in teachers], multi.weights, loss, device)
    if multi is not None:
        console.print(f"[bold]distilled[/bold]: {len(teachers)} teachers, combined as {multi.combine}")
    if loss.features:
        distiller = feature_distiller(recipe, model, teachers[0], example)
        console.print(distiller.describe(), markup=False, highlight=False)
        objective = FeatureObjective(objective, distiller)
    return objective


def train_arm(arm: str, recipe: Recipe, data: ClassificationData, teachers: list[nn.Module], run_dir: Path,
              metrics: MetricsLog, device: torch.device, show_progress: bool, console: Console) -> None:
    """Train one arm into its folder (skipped when the folder already holds its model)."""
    from distil.pipelines import classification as c

    folder = run_dir / c.ARM_FOLDERS[arm]
    if c._is_model_folder(folder):
        console.print(f"[bold]{arm}[/bold]: already trained ({folder})")
        return
    if arm == "born_again":
        _born_again(recipe, data, run_dir, metrics, device, show_progress, console)
        return
    seed_everything(recipe.seed)
    model = build_classifier(recipe.student.model, data.input_shape, data.num_classes).to(device)
    example = data.train_x[:2].to(device)
    test_x, test_y = c._eval_split(recipe, data)
    exits = None
    if arm == "student_alone":
        objective: Any = ClassifierObjective(model, None, recipe.loss, device)
    elif arm == "logit_kd":
        objective = ClassifierObjective(model, Teacher(teachers[0]), recipe.loss, device)
    elif arm == "distilled":
        objective = _distilled_objective(recipe, model, teachers, example, device, console)
    elif arm == "ema":
        objective = EMAObjective(model, recipe.self_distill.ema, recipe.loss, device, recipe.train.grad_accum)
    elif arm == "deep_supervision":
        spec = recipe.self_distill.deep_supervision
        with torch.random.fork_rng(devices=[]):  # the student's RNG stream stays the one of the other arms
            torch.manual_seed(recipe.seed)
            exits = build_exits(model, example, data.num_classes, spec.exits)
        console.print(f"[bold]deep_supervision[/bold]: exits on {', '.join(exits.names)}")
        objective = DeepSupervisionObjective(model, exits, spec, device)
    else:
        raise ValueError(f"unknown arm {arm}")
    seconds = c._train_classifier(arm, model, None, recipe.loss, recipe.train, data, recipe, run_dir, metrics, device,
                                  show_progress, objective=objective)
    report: dict[str, Any] = {}
    if exits is not None:
        report["exit_accuracy"] = exit_accuracies(model, exits, test_x, test_y, device)
    if arm == "ema":
        report["ema_accuracy"] = c.accuracy(objective.ema.model, test_x, test_y, device)
    config = classifier_config(recipe.student.model, data.input_shape, data.num_classes)
    c.save_model_folder(folder, model, config, {"train_time_s": seconds, "report": report})


def _born_again(recipe: Recipe, data: ClassificationData, run_dir: Path, metrics: MetricsLog, device: torch.device,
                show_progress: bool, console: Console) -> None:
    """Generation 0 learns from labels (the student_alone arm, when the recipe has it); generation k learns from
    generation k-1. The arm's folder holds the last generation; each generation's accuracy goes in its report."""
    from distil.pipelines import classification as c

    spec = recipe.self_distill.born_again
    loss = born_again_loss(recipe.loss, spec)
    reuse = "student_alone" in recipe.arms
    folders = [run_dir / (c.ARM_FOLDERS["student_alone"] if reuse else "born_again-gen0")]
    folders += [run_dir / f"born_again-gen{k}" for k in range(1, spec.generations + 1)]
    config = classifier_config(recipe.student.model, data.input_shape, data.num_classes)
    for k, folder in enumerate(folders):
        if c._is_model_folder(folder):
            continue
        name = ("student_alone" if reuse else "born_again-gen0") if k == 0 else f"born_again-gen{k}"
        teacher = None if k == 0 else Teacher(load_classifier(folders[k - 1]).to(device))
        console.print(f"[bold]born_again[/bold]: generation {k}" + (f" learns from generation {k - 1}" if k else ""))
        seed_everything(recipe.seed)
        model = build_classifier(recipe.student.model, data.input_shape, data.num_classes).to(device)
        seconds = c._train_classifier(name, model, teacher, recipe.loss if k == 0 else loss, recipe.train, data,
                                      recipe, run_dir, metrics, device, show_progress)
        c.save_model_folder(folder, model, config, {"train_time_s": seconds, "report": {}})
    test_x, test_y = c._eval_split(recipe, data)
    accuracies, times = [], []
    for folder in folders:
        accuracies.append(c.accuracy(load_classifier(folder).to(device), test_x, test_y, device))
        info = folder / "train.json"
        times.append(json.loads(info.read_text()).get("train_time_s") if info.exists() else None)
    last = load_classifier(folders[-1]).to(device)
    generated = [t for t in times[1:] if t is not None]
    c.save_model_folder(run_dir / c.ARM_FOLDERS["born_again"], last, config, {
        "train_time_s": sum(generated) if generated else None,
        "report": {"generation_accuracy": accuracies, "generation_train_time_s": times},
    })


def print_extras(summary: dict[str, Any], console: Console) -> None:
    """Per-exit, per-generation and EMA accuracies, which the summary table has no columns for."""
    for arm, values in summary["arms"].items():
        if "exit_accuracy" in values:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values["exit_accuracy"].items())
            console.print(f"{arm}: accuracy per exit (shallowest first): {shown}")
        if "generation_accuracy" in values:
            shown = ", ".join(f"gen {i} {v:.4f}" for i, v in enumerate(values["generation_accuracy"]))
            console.print(f"{arm}: accuracy per generation: {shown}")
        if "ema_accuracy" in values:
            console.print(f"{arm}: accuracy of the EMA teacher {values['ema_accuracy']:.4f}")
