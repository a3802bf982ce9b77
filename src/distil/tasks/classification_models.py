"""The models of task classification: built-in MLP/CNN classifiers on tensors (images, table rows), and Hugging Face
sequence classifiers on texts and image classifiers on image folders (a source's backbone with a classification head,
or a student built from the teacher with make_student). One place builds, saves and loads every kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distil.config.schema import CNNSpec, FromTeacherSpec, HFModelSpec, MLPSpec, Recipe
from distil.data.sources.base import ClassificationData
from distil.diskspace import tensor_bytes
from distil.errors import DistilError
from distil.models import hf
from distil.models.image_classifier import ImageClassifier, load_image_classifier, load_saved_image_classifier
from distil.models.classifier_folders import is_hf_folder
from distil.models.text_classifier import TextClassifier, load_saved, load_text_classifier
from distil.models.vision import build_classifier, classifier_config, load_classifier
from distil.tasks.artifacts import save_model_folder
from distil.train import distributed
from distil.train.checkpoint import save_tensors, write_json

HF_ARCHS = ("hf", "from_teacher")
HF_DATA_KINDS = ("texts", "images")  # the data Hugging Face classifiers read: raw texts, image folders


def reads_text(recipe: Recipe) -> bool:
    return recipe.data.kind == "texts"


def uses_hf(recipe: Recipe) -> bool:
    """Whether the recipe's teacher or student is a Hugging Face classifier."""
    return any(spec.model.arch in HF_ARCHS for spec in (recipe.teacher, recipe.student))


def build_model(spec: Any, data: ClassificationData, recipe: Recipe, teacher: nn.Module | None = None
                ) -> tuple[nn.Module, bool]:
    """A classifier of `spec` for `data`: (model, already trained?). Only a source that is a fine-tuned sequence
    classifier of the data's labels comes trained."""
    if isinstance(spec, (MLPSpec, CNNSpec)):
        return build_classifier(spec, data.input_shape, data.num_classes), False
    if isinstance(spec, HFModelSpec):
        # fp32 weights: classifiers are trained here (the loop's train.precision autocasts where bf16 is native)
        path, labels = hf.resolve_model_path(spec.source), data.label_names or []
        if reads_text(recipe):
            return load_text_classifier(path, labels, recipe.data.max_length,  # type: ignore[union-attr]
                                        trust_remote_code=spec.trust_remote_code)
        return load_image_classifier(path, labels, data.input_shape, trust_remote_code=spec.trust_remote_code)
    if isinstance(spec, FromTeacherSpec):
        from distil.tasks.hf_models import student_from_teacher

        if isinstance(teacher, TextClassifier):
            return TextClassifier(student_from_teacher(spec, teacher.model).train(), teacher.tokenizer,
                                  teacher.max_length), False
        if isinstance(teacher, ImageClassifier):
            return ImageClassifier(student_from_teacher(spec, teacher.model).train()), False
        raise DistilError("student.model.arch from_teacher needs a Hugging Face teacher (teacher.model.arch: hf)")
    raise DistilError(f"unknown model arch {spec!r}")


def save_model(folder: Path, model: nn.Module, spec: Any, data: ClassificationData, info: dict[str, Any]) -> None:
    """Weights + what rebuilds them + train.json, written whole by rank 0 (under FSDP every rank helps gather them).
    A Hugging Face classifier is a plain Hugging Face folder (`pipeline("text-classification")` or
    `pipeline("image-classification")` loads it)."""
    if isinstance(model, (TextClassifier, ImageClassifier)):
        def fill_hf(tmp: Path) -> None:
            if isinstance(model, TextClassifier):
                model.save(tmp)
            else:
                model.save(tmp, data.pixel_stats, data.input_shape[1:])
            write_json(tmp / "train.json", info)

        save_model_folder(folder, fill_hf, lambda: tensor_bytes(model.state_dict().values(), files=8))
        return
    weights = distributed.full_state_dict(model)
    config = classifier_config(spec, data.input_shape, data.num_classes)
    if data.label_names is not None:
        config["labels"] = data.label_names

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", weights)
        write_json(tmp / "config.json", config)
        write_json(tmp / "train.json", info)

    save_model_folder(folder, fill, lambda: tensor_bytes(weights.values(), files=3))


def load_model(folder: Path, recipe: Recipe) -> nn.Module:
    """A saved classifier of either kind, in eval mode."""
    if is_hf_folder(folder):
        if reads_text(recipe):
            return load_saved(folder, recipe.data.max_length)  # type: ignore[union-attr]
        return load_saved_image_classifier(folder)
    return load_classifier(folder)
