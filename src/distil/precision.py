"""Precision follows the hardware: bf16 only where the device runs it natively, fp32 otherwise.

On a CPU without AVX-512-BF16 or AMX (e.g. AMD EPYC with AVX2 only) bf16 matmuls are emulated and several times
slower than fp32, so `auto` must not pick it there. A recipe's `train.precision: auto` and `teacher.model.dtype:
auto` are resolved once, when the recipe is loaded, into the values the run records in its recipe.yaml; a resumed
run keeps what was chosen.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distil.config.schema import Recipe


def device_kind(device: str) -> str:
    """The device type a recipe's `train.device` will run on ("cuda" or "cpu"), without starting anything."""
    return "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"


@functools.cache
def bf16_native(kind: str) -> bool:
    """Whether `kind` ("cpu", "cuda") computes bf16 matmuls in hardware."""
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":  # oneDNN's own test: AVX-512-BF16 or AMX
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def train_precision(precision: str, kind: str) -> str:
    """`auto` -> "bf16" where native, else "fp32"; "fp32" and "bf16" are kept as given."""
    if precision == "auto":
        return "bf16" if bf16_native(kind) else "fp32"
    return precision


def teacher_dtype(dtype: str | None, precision: str, kind: str) -> str | None:
    """A teacher's `dtype: auto` follows the student's precision: bfloat16 with bf16, float32 otherwise."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if train_precision(precision, kind) == "bf16" else "float32"


def resolve_precision(recipe: Recipe) -> Recipe:
    """The recipe with every `auto` precision and dtype replaced by what this machine runs natively.

    An explicit bf16 on a device without native bf16 is kept (the user asked for it), with one warning line."""
    from distil.config.schema import HFModelSpec

    kind = device_kind(recipe.train.device)
    update: dict = {"train": recipe.train.model_copy(update={"precision": train_precision(recipe.train.precision, kind)})}
    if recipe.teacher.train is not None:
        spec = recipe.teacher.train
        update["teacher"] = recipe.teacher.model_copy(
            update={"train": spec.model_copy(update={"precision": train_precision(spec.precision, kind)})})
    model = recipe.teacher.model
    if isinstance(model, HFModelSpec) and model.dtype == "auto":
        teacher = update.get("teacher", recipe.teacher)
        dtype = teacher_dtype("auto", update["train"].precision, kind)
        update["teacher"] = teacher.model_copy(update={"model": model.model_copy(update={"dtype": dtype})})
    resolved = recipe.model_copy(update=update)
    asked = [key for key, value in (("train.precision", recipe.train.precision),
                                    ("teacher.model.dtype", getattr(model, "dtype", None))) if value in ("bf16", "bfloat16")]
    if asked and not bf16_native(kind):
        verb = "ask" if len(asked) > 1 else "asks"
        warnings.warn(f"{' and '.join(asked)} {verb} for bf16, which this {kind.upper()} does not run natively (no "
                      "AVX-512-BF16 or AMX): bf16 matmuls are emulated and several times slower than fp32; "
                      "train.precision=auto picks fp32 here", stacklevel=2)
    return resolved


def describe_precision(recipe: Recipe) -> str:
    """One line for the start of a run: what it computes in, and why."""
    kind = device_kind(recipe.train.device)
    native = "native" if bf16_native(kind) else "not native"
    dtype = getattr(recipe.teacher.model, "dtype", None)
    teacher = f", teacher {dtype}" if dtype else ""
    return f"precision: {recipe.train.precision}{teacher} (bf16 is {native} on this {kind.upper()})"
