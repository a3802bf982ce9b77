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

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distil.config.adapt import feature_terms, logit_loss, self_distill_loss, train_config
from distil.config.schema import TEACHER_ARMS, FromTeacherSpec, HFModelSpec, Recipe, TeacherSpec, TrainSpec
from distil.data.stream import BatchStream
from distil.data.sources import LoadedData
from distil.data.sources.labelled import UNLABELLED
from distil.data.sources.base import ClassificationData, take
from distil.distill.feature_objective import FeatureDistiller, FeatureObjective
from distil.distill.multi_teacher import MultiTeacherObjective, TeacherMixture
from distil.distill.objectives import ClassifierObjective, LogitLoss, to_device
from distil.distill.pair import Teacher, check_pair
from distil.distill.self_distill import DeepSupervisionObjective, EMAObjective
from distil.measure.classification import accuracy
from distil.models.exits import build_exits, exit_accuracies
from distil.models import hf
from distil.models.classifier_folders import is_fine_tuned_folder
from distil.models.image_classifier import ImageClassifier
from distil.models.text_classifier import TextClassifier
from distil.tasks.classification_models import build_model, load_model, save_model
from distil.paths import cache_dir
from distil.tasks.artifacts import ARM_FOLDERS, is_model_folder
from distil.tasks.base import RunContext
from distil.train.loop import Stage, train
from distil.train.seed import seed_everything


TRANSFER_ARMS = ("logit_kd", "distilled", "ema")  # arms that learn from a teacher's outputs on unlabelled rows too


def teacher_folder(recipe: Recipe, spec: TeacherSpec | None = None) -> Path:
    """Where a teacher's weights live: its `checkpoint`, or a cache folder keyed by everything that shapes them."""
    spec = spec or recipe.teacher
    if spec.checkpoint:
        return Path(spec.checkpoint).expanduser()
    if isinstance(spec.model, HFModelSpec) and is_fine_tuned_folder(Path(spec.model.source).expanduser()):
        return Path(spec.model.source).expanduser()  # a fine-tuned classifier is used as it is
    dumped = spec.model_dump(mode="json")
    if dumped.get("seed") is None:  # keys written before teachers had a seed of their own stay valid
        dumped.pop("seed", None)
    seed = recipe.seed if spec.seed is None else spec.seed
    key = json.dumps([recipe.data.model_dump(mode="json"), dumped, seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    data_name = getattr(recipe.data, "name", recipe.data.kind)
    return cache_dir() / "teachers" / f"{data_name}-{spec.model.arch}-{digest}"


def new_student(recipe: Recipe, data: ClassificationData, teachers: list[nn.Module]) -> nn.Module:
    """The recipe's untrained student (from the recipe's seed), on the CPU.

    A Hugging Face student `from_teacher` is cut from the teacher's pretrained backbone with a new head, as
    DistilBERT was from BERT, not from the teacher fine-tuned on the labels: the alone arm then learns only from what
    it is given. (From a teacher given already fine-tuned, it is cut from that.)"""
    seed_everything(recipe.seed)
    source = teachers[0] if teachers else None
    if isinstance(recipe.student.model, FromTeacherSpec) and isinstance(recipe.teacher.model, HFModelSpec):
        given = hf.resolve_model_path(recipe.teacher.model.source)  # type: ignore[union-attr]
        if not is_fine_tuned_folder(given):
            source = build_model(recipe.teacher.model, data, recipe)[0]  # the pretrained encoder, a new head
            seed_everything(recipe.seed)
    model = build_model(recipe.student.model, data, recipe, source)[0]
    if recipe.student.freeze_embeddings and isinstance(model, TextClassifier):  # inherited, most of the parameters
        model.model.get_input_embeddings().weight.requires_grad_(False)
    return model


def training_rows(labels: torch.Tensor, spec: TrainSpec, seed: int, transfer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows a stage trains on, the labels it sees: -1 where unlabelled). `subset` and `labelled` take the first N of
    one seeded shuffle; a transfer stage (one with a teacher) trains on every row, the others on labelled rows only."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    rows = order[: spec.subset or len(labels)]
    seen = labels.clone()
    if spec.labelled is not None:
        seen[order[spec.labelled:]] = UNLABELLED
    return (rows if transfer else rows[seen[rows] != UNLABELLED]), seen


def train_classifier(name: str, model: nn.Module, teacher: Teacher | None, loss: LogitLoss, spec: TrainSpec,
                     data: LoadedData, recipe: Recipe, ctx: RunContext, objective: Any = None,
                     transfer: bool | None = None) -> float:
    """Train one arm (or a teacher); returns the seconds its training took, summed over resumed runs (the work a
    killed run did after its last checkpoint is redone and counted once).

    `objective` replaces the default ClassifierObjective(model, teacher, loss) (variants: features, EMA, exits).
    `transfer` (default: whether there is a teacher): train on unlabelled rows too, their hard-label term zero."""
    transfer = teacher is not None if transfer is None else transfer
    rows, labels = training_rows(data.corpus.train_y, spec, recipe.seed, transfer)

    def collate(i: torch.Tensor) -> Any:
        return data.collate(rows[i])[0], labels[rows[i]]

    stream = BatchStream(len(rows), spec.batch_size, collate, seed=recipe.seed)
    test_x, test_y = data.eval
    objective = objective or ClassifierObjective(model, teacher, loss, ctx.device)
    # A transformer's pass over the held-out texts or images costs tens of seconds on a CPU, and the measurement
    # after training makes it anyway: its stages evaluate only when train.eval_every asks.
    costly = isinstance(model, (TextClassifier, ImageClassifier)) and not spec.eval_every
    stage = Stage(name, objective, stream, train_config(spec), ctx.run_dir / "checkpoints" / name, ctx.metrics, ctx.device,
                  evaluate=None if costly else lambda: {"accuracy": accuracy(model, test_x, test_y, ctx.device)},
                  recipe=recipe.model_dump(mode="json"))
    train(stage, show_progress=ctx.show_progress)
    return stage.elapsed_s


def teacher_specs(recipe: Recipe) -> list[TeacherSpec]:
    """The teachers the recipe's arms need: none for self-distillation alone; teacher 0, then multi_teacher's."""
    if not any(arm in TEACHER_ARMS for arm in recipe.arms):
        return []
    extra = recipe.multi_teacher.teachers if recipe.multi_teacher and "distilled" in recipe.arms else []
    return [recipe.teacher, *extra]


def feature_distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module, example: torch.Tensor
                      ) -> FeatureDistiller:
    distiller = FeatureDistiller(feature_terms(recipe.loss.features), student, teacher)
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
    loss, multi = logit_loss(recipe.loss), recipe.multi_teacher
    if multi is None:
        objective: Any = ClassifierObjective(model, Teacher(teachers[0]), loss, device)
    elif multi.combine == "mixture":
        objective = ClassifierObjective(model, Teacher(TeacherMixture(teachers, multi.weights, loss.temperature)),
                                        loss, device)
    else:
        objective = MultiTeacherObjective(model, [Teacher(t) for t in teachers], multi.weights, loss, device)
    if multi is not None:
        console.print(f"[bold]distilled[/bold]: {len(teachers)} teachers, combined as {multi.combine}")
    if recipe.loss.features:
        distiller = feature_distiller(recipe, model, teachers[0], example)
        console.print(distiller.describe(), markup=False, highlight=False)
        objective = FeatureObjective(objective, distiller)
    return objective


def train_arm(arm: str, folder: Path, loaded: LoadedData, teachers: list[nn.Module], ctx: RunContext) -> None:
    """Train one arm from the recipe's student and save it into `folder`."""
    recipe, device, console, data = ctx.recipe, ctx.device, ctx.console, loaded.corpus
    if arm == "born_again":
        _born_again(folder, loaded, ctx)
        return
    model = new_student(recipe, data, teachers).to(device)
    example = to_device(take(data.train_x, torch.arange(2)), device)
    test_x, test_y = loaded.eval
    exits = None
    if arm == "student_alone":
        objective: Any = ClassifierObjective(model, None, logit_loss(recipe.loss), device)
    elif arm == "logit_kd":
        objective = ClassifierObjective(model, Teacher(teachers[0]), logit_loss(recipe.loss), device)
    elif arm == "distilled":
        objective = _distilled_objective(recipe, model, teachers, example, device, console)
    elif arm == "ema":
        ema = recipe.self_distill.ema
        objective = EMAObjective(model, self_distill_loss(recipe.loss, ema), device, decay=ema.decay)
    elif arm == "deep_supervision":
        spec = recipe.self_distill.deep_supervision
        with torch.random.fork_rng(devices=[]):  # the student's RNG stream stays the one of the other arms
            torch.manual_seed(recipe.seed)
            exits = build_exits(model, example, data.num_classes, spec.exits)
        console.print(f"[bold]deep_supervision[/bold]: exits on {', '.join(exits.names)}")
        objective = DeepSupervisionObjective(model, exits, device, alpha=spec.alpha, temperature=spec.temperature,
                                             feature_weight=spec.feature_weight)
    else:
        raise ValueError(f"unknown arm {arm}")
    seconds = train_classifier(arm, model, None, logit_loss(recipe.loss), recipe.train, loaded, recipe, ctx,
                               objective=objective, transfer=arm in TRANSFER_ARMS)
    report: dict[str, Any] = {}
    if exits is not None:
        report["exit_accuracy"] = exit_accuracies(model, exits, test_x, test_y, device)
    if arm == "ema":
        report["ema_accuracy"] = accuracy(objective.ema.model, test_x, test_y, device)
    save_model(folder, model, recipe.student.model, data, {"train_time_s": seconds, "report": report})


def _born_again(arm_folder: Path, loaded: LoadedData, ctx: RunContext) -> None:
    """Generation 0 learns from labels (the student_alone arm, when the recipe has it); generation k learns from
    generation k-1. The arm's folder holds the last generation; each generation's accuracy goes in its report."""
    recipe, run_dir, device, data = ctx.recipe, ctx.run_dir, ctx.device, loaded.corpus
    spec = recipe.self_distill.born_again
    loss = self_distill_loss(recipe.loss, spec)
    reuse = "student_alone" in recipe.arms
    folders = [run_dir / (ARM_FOLDERS["student_alone"] if reuse else "born_again-gen0")]
    folders += [run_dir / f"born_again-gen{k}" for k in range(1, spec.generations + 1)]
    for k, folder in enumerate(folders):
        if is_model_folder(folder):
            continue
        name = ("student_alone" if reuse else "born_again-gen0") if k == 0 else f"born_again-gen{k}"
        teacher = None if k == 0 else Teacher(load_model(folders[k - 1], recipe).to(device))
        ctx.console.print(f"[bold]born_again[/bold]: generation {k}" + (f" learns from generation {k - 1}" if k else ""))
        model = new_student(recipe, data, []).to(device)
        seconds = train_classifier(name, model, teacher, logit_loss(recipe.loss) if k == 0 else loss, recipe.train,
                                   loaded, recipe, ctx)
        save_model(folder, model, recipe.student.model, data, {"train_time_s": seconds, "report": {}})
    test_x, test_y = loaded.eval
    accuracies, times = [], []
    for folder in folders:
        accuracies.append(accuracy(load_model(folder, recipe).to(device), test_x, test_y, device))
        info = folder / "train.json"
        times.append(json.loads(info.read_text()).get("train_time_s") if info.exists() else None)
    last = load_model(folders[-1], recipe).to(device)
    generated = [t for t in times[1:] if t is not None]
    save_model(arm_folder, last, recipe.student.model, data, {
        "train_time_s": sum(generated) if generated else None,
        "report": {"generation_accuracy": accuracies, "generation_train_time_s": times},
    })
