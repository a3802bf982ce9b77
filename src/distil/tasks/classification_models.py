"""The models of task classification: built-in MLP/CNN classifiers on tensors (images, table rows), and Hugging Face
sequence classifiers on texts (a source's encoder with a classification head, or a student built from the teacher
with make_student). One place builds, saves and loads both kinds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distil.config.schema import CNNSpec, FromTeacherSpec, HFModelSpec, MLPSpec, Recipe
from distil.data.sources.base import ClassificationData
from distil.diskspace import tensor_bytes
from distil.errors import DistilError
from distil.models import hf
from distil.models.text_classifier import TextClassifier, is_hf_folder, load_saved, load_text_classifier
from distil.models.vision import build_classifier, classifier_config, load_classifier
from distil.tasks.artifacts import save_model_folder
from distil.train import distributed
from distil.train.checkpoint import save_tensors, write_json

TEXT_ARCHS = ("hf", "from_teacher")


def reads_text(recipe: Recipe) -> bool:
    return recipe.data.kind == "texts"


def build_model(spec: Any, data: ClassificationData, recipe: Recipe, teacher: nn.Module | None = None
                ) -> tuple[nn.Module, bool]:
    """A classifier of `spec` for `data`: (model, already trained?). Only a source that is a fine-tuned sequence
    classifier of the data's labels comes trained."""
    if isinstance(spec, (MLPSpec, CNNSpec)):
        return build_classifier(spec, data.input_shape, data.num_classes), False
    max_length = recipe.data.max_length
    if isinstance(spec, HFModelSpec):
        # fp32 weights: classifiers are trained here (the loop's train.precision autocasts where bf16 is native)
        return load_text_classifier(hf.resolve_model_path(spec.source), data.label_names or [], max_length,
                                    trust_remote_code=spec.trust_remote_code)
    if isinstance(spec, FromTeacherSpec):
        from distil.tasks.hf_models import student_from_teacher

        if not isinstance(teacher, TextClassifier):
            raise DistilError("student.model.arch from_teacher needs a Hugging Face teacher (teacher.model.arch: hf)")
        return TextClassifier(student_from_teacher(spec, teacher.model).train(), teacher.tokenizer, max_length), False
    raise DistilError(f"unknown model arch {spec!r}")


def save_model(folder: Path, model: nn.Module, spec: Any, data: ClassificationData, info: dict[str, Any]) -> None:
    """Weights + what rebuilds them + train.json, written whole by rank 0 (under FSDP every rank helps gather them).
    A text classifier is a plain Hugging Face folder (`pipeline("text-classification")` loads it)."""
    if isinstance(model, TextClassifier):
        def fill_hf(tmp: Path) -> None:
            model.save(tmp)
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
        return load_saved(folder, recipe.data.max_length if reads_text(recipe) else None)
    return load_classifier(folder)
