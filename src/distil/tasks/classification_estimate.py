"""The memory estimate of a classification recipe: teacher and student built on the meta device, activations and
loss buffers traced from the real objective."""

from __future__ import annotations

import math

import torch
from torch import nn

from distil.config.adapt import logit_loss
from distil.config.schema import Recipe, TrainSpec
from distil.distill.objectives import ClassifierObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.estimate.memory import (EstimateUnavailable, MemoryEstimate, MemoryItem, StageEstimate, first_line,
                                    largest_inference_pair, optimizer_bytes, optimizer_step_bytes, parameter_bytes,
                                    saved_tensor_bytes, trace_saved)
from distil.models.vision import build_classifier
from distil.tasks.artifacts import is_model_folder
from distil.tasks.classification_arms import teacher_folder

# (input shape, classes, train examples, test examples) of the built-in datasets, known without loading them.
VISION_SHAPES = {
    "digits": ((1, 8, 8), 10, 1348, 449),
    "fashion-mnist": ((1, 28, 28), 10, 60000, 10000),
}
EVAL_BATCH = 1000  # distil.measure.classification.accuracy
LOSS_BUFFERS_PER_LOGIT = 8


def estimate_classification(recipe: Recipe) -> MemoryEstimate:
    if recipe.data.kind != "vision":  # the shapes of the user's data are known only once it is read
        raise EstimateUnavailable(f"memory estimates of task classification cover the built-in image datasets, not "
                                  f"data.kind {recipe.data.kind} yet")
    shape, classes, n_train, n_test = VISION_SHAPES[recipe.data.name]
    per_example = 4 * math.prod(shape) + 8  # float32 image + int64 label
    cuda = recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())
    meta = torch.device("meta")

    def build(spec: object, what: str) -> nn.Module:
        try:
            with meta:
                return build_classifier(spec, shape, classes)  # type: ignore[arg-type]
        except (RuntimeError, ValueError, OverflowError, TypeError) as exc:  # e.g. a width beyond int64
            raise DistilError(f"{what}.model cannot be built: {first_line(exc)}") from None

    def stage(name: str, model: nn.Module, teacher: nn.Module | None, distil: bool, spec: TrainSpec) -> StageEstimate:
        frozen = Teacher(teacher) if teacher is not None else None
        params = list(model.parameters())
        trainable = parameter_bytes(model, trainable=True)
        try:
            x = torch.empty((spec.batch_size, *shape), device=meta)
            y = torch.empty((spec.batch_size,), dtype=torch.long, device=meta)
            activations, widest = trace_saved(lambda: model(x), exclude=params)
            objective = ClassifierObjective(model, frozen if distil else None, logit_loss(recipe.loss), meta)
            try:
                with_loss = saved_tensor_bytes(lambda: objective.loss((x, y)), exclude=params)
            except (RuntimeError, NotImplementedError):  # a loss with data-dependent shapes (dkd) cannot run on meta
                # logits, log-softmaxes and probabilities of student and teacher at T and at 1
                with_loss = activations + LOSS_BUFFERS_PER_LOGIT * spec.batch_size * classes * 4
            n_eval = min(EVAL_BATCH, recipe.data.eval_size or n_test, n_test)
            evaluation = largest_inference_pair(model, torch.empty((n_eval, *shape), device=meta))
        except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
            raise DistilError(f"stage '{name}': cannot size its activations ({first_line(exc)})") from None
        opt, opt_detail = optimizer_bytes(spec, trainable)
        subset = min(spec.subset or n_train, n_train)
        items = [MemoryItem("dataset", (n_train + n_test + subset) * per_example,
                            f"{n_train + n_test} examples + the {subset} of this stage", host=True)]
        if teacher is not None:
            items.append(MemoryItem("teacher weights", parameter_bytes(teacher), "frozen, fp32"))
        items += [
            MemoryItem("student weights" if teacher is not None else "teacher weights (training)",
                       parameter_bytes(model), "fp32"),
            MemoryItem("gradients", trainable),
            MemoryItem("optimizer state", opt, opt_detail),
        ]
        # The backward pass holds the saved activations plus, at the widest layer, the gradient coming in, the one
        # going out and the temporary of its activation function's backward (three tensors of its size). The
        # optimizer step and evaluations come after it, but do not get its memory back: the allocator keeps what
        # backward freed (glibc keeps blocks under 32 MB in its heap; CUDA's caching allocator keeps them reserved)
        # while their larger buffers are new. So they add to it; they never overlap each other: count the larger.
        items += [
            MemoryItem("activations", activations, f"saved for backward, batch {spec.batch_size}"),
            MemoryItem("logits and loss buffers", max(0, with_loss - activations)),
            MemoryItem("backward workspace", 3 * widest, "gradients through the widest layer"),
        ]
        largest_param = max((p.numel() * p.element_size() for p in params if p.requires_grad), default=0)
        step = optimizer_step_bytes(spec, trainable, largest_param, cuda)
        if step >= evaluation:
            items.append(MemoryItem("optimizer step workspace", step, f"{spec.optimizer} temporaries"))
        else:
            items.append(MemoryItem("evaluation buffers", evaluation, f"inference at batch {EVAL_BATCH}"))
        if cuda:  # checkpoints are staged in host memory: first the weights, then the optimizer state
            items.append(MemoryItem("checkpoint staging", max(parameter_bytes(model), opt), "host copy", host=True))
        return StageEstimate(name, items)

    stages = []
    has_teacher = is_model_folder(teacher_folder(recipe))
    if not has_teacher and recipe.teacher.train is not None:
        stages.append(stage("teacher", build(recipe.teacher.model, "teacher"), None, False, recipe.teacher.train))
    teacher = build(recipe.teacher.model, "teacher")
    for arm in recipe.arms:
        student = build(recipe.student.model, "student")
        stages.append(stage(arm, student, teacher, arm == "distilled", recipe.train))
    return MemoryEstimate("cuda" if cuda else "cpu", stages)
