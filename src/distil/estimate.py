"""How much memory a run will need, before it starts: `distil estimate RECIPE` and `distil validate` print it, and
`distil run` refuses a recipe whose estimate exceeds the machine's memory.

A run is a sequence of stages (the teacher stage, then each arm); the estimate of each stage is the sum of what is
resident while it trains, and the run's estimate is its largest stage:

- weights of every model in memory (the model being trained, the frozen teacher);
- gradients (one per trainable parameter) and optimizer state (AdamW: two fp32 tensors per parameter; SGD with
  momentum: one);
- activations saved for the backward pass, measured exactly by running the real objective on the `meta` device (no
  memory is allocated) with `torch.autograd.graph.saved_tensors_hooks`, the loss's own buffers (logits, softmaxes
  at temperature T) the same way, and the gradients flowing back through the widest layer (three of its tensors);
- the larger of the optimizer step's temporaries and the evaluation buffers. These come after the backward pass
  but do not get its memory back (the allocator keeps it), so they are added to it;
- the dataset held in host memory.

The numbers are what the tensors need. The interpreter and torch's libraries come on top, and so does allocator
fragmentation: runs whose activations are many mid-sized tensors (CNNs at large batch) measured 1.0-1.35x the
estimate in peak RSS with glibc's default malloc, varying from run to run. tests/reliability/test_estimate.py measures runs' peak RSS against
the estimate (method in its docstring).

Extension point: each task registers `ESTIMATORS[task] = fn`, `fn(recipe) -> MemoryEstimate`. A task without one
gets no estimate and no memory pre-flight check. For `causal_lm` the estimator should build teacher and student from
their configs on the meta device (`with torch.device("meta"): AutoModelForCausalLM.from_config(cfg)`) and report:
teacher weights in their dtype; student weights, gradients and fp32 AdamW states (`parameter_bytes`); activations
from `saved_tensor_bytes` on a meta batch of `batch_size x max_length` (or per-layer hidden x tokens x a small factor
when a model does not run on meta); and the logits buffers -- the full `tokens x vocab` fp32 logits of student and
teacher and their log-softmaxes when the loss is not chunked, `chunk_size x vocab` per chunk when it is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distil.config.schema import Recipe, TrainSpec
from distil.errors import DistilError


@dataclass
class MemoryItem:
    name: str
    bytes: int
    detail: str = ""
    host: bool = False  # held in host RAM even when the models train on a GPU (datasets, checkpoint staging)


@dataclass
class StageEstimate:
    name: str
    items: list[MemoryItem] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    def on(self, host: bool) -> int:
        return sum(item.bytes for item in self.items if item.host == host)


@dataclass
class MemoryEstimate:
    device: str  # "cpu" or "cuda": on cpu, host and device memory are the same RAM
    stages: list[StageEstimate]

    @property
    def peak(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        return self.peak.total

    def format(self, prefix: str = "") -> str:
        peak = self.peak
        where = "RAM" if self.device == "cpu" else f"{human(peak.on(False))} GPU + {human(peak.on(True))} host RAM"
        lines = [f"memory estimate: {human(peak.total)} at peak, during '{peak.name}' ({where})"]
        width = max(len(item.name) for item in peak.items)
        for item in peak.items:
            detail = f"  ({item.detail})" if item.detail else ""
            lines.append(f"  {item.name:<{width}}  {human(item.bytes):>9}{detail}")
        others = [f"{s.name} {human(s.total)}" for s in self.stages if s is not peak]
        if others:
            lines.append(f"  other stages: {', '.join(others)}")
        lines.append("  (tensors only; the interpreter and torch add a few hundred MB)")
        return "\n".join(prefix + line for line in lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}" if n < 1e6 else f"{n:.2g} {unit}"
        n /= 1024
    return f"{n} B"


# ------------------------------------------------------------------------------------------------ measuring tools
def parameter_bytes(model: nn.Module, *, trainable: bool | None = None) -> int:
    """Bytes of the parameters and buffers (trainable=None), or of the (non-)trainable parameters only."""
    if trainable is None:
        tensors = [*model.parameters(), *model.buffers()]
    else:
        tensors = [p for p in model.parameters() if p.requires_grad == trainable]
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_tensor_bytes(fn: Callable[[], object], exclude: list[torch.Tensor] | tuple = ()) -> int:
    """Bytes autograd keeps for the backward pass while `fn()` runs (run it on the meta device: nothing is
    allocated). Tensors sharing a storage count once; `exclude` (the parameters) counts zero."""
    return trace_saved(fn, exclude)[0]


def trace_saved(fn: Callable[[], object], exclude: list[torch.Tensor] | tuple = ()) -> tuple[int, int]:
    """(total, largest) bytes of the storages autograd saves for backward while `fn()` runs; see saved_tensor_bytes."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # hold every saved tensor so no storage id is reused while tracing

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            storages[storage._cdata] = max(storages.get(storage._cdata, 0), t.numel() * t.element_size())
        keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), max(storages.values(), default=0)


def largest_inference_pair(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the largest input + output of one leaf module in an inference forward pass: the transient peak of
    evaluation, when activations are freed as soon as the next layer has consumed them."""
    peak = [example.numel() * example.element_size()]

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if isinstance(output, torch.Tensor):
            tensors.append(output)
        peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in tensors))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return peak[0]


def optimizer_bytes(spec: TrainSpec, trainable: int) -> tuple[int, str]:
    if spec.optimizer == "adamw":
        return 2 * trainable, "adamw: exp_avg + exp_avg_sq"
    if spec.momentum > 0:
        return trainable, "sgd: momentum buffer"
    return 0, "sgd without momentum"


def optimizer_step_bytes(spec: TrainSpec, trainable: int, largest: int, cuda: bool) -> int:
    """Temporaries of one optimizer step. torch's AdamW on CPU goes parameter by parameter and holds sqrt(v) and
    sqrt(v) / bias_correction of one parameter at once; on GPU its foreach path holds sqrt(v) of all of them."""
    if spec.optimizer == "adamw":
        return trainable if cuda else 2 * largest
    return largest if spec.weight_decay > 0 else 0  # SGD: grad + weight_decay * param

# ------------------------------------------------------------------------------------------------- classification
# (input shape, classes, train examples, test examples) of the built-in datasets, known without loading them.
VISION_SHAPES = {
    "digits": ((1, 8, 8), 10, 1348, 449),
    "fashion-mnist": ((1, 28, 28), 10, 60000, 10000),
}
EVAL_BATCH = 1000  # distil.pipelines.classification.accuracy
LOSS_BUFFERS_PER_LOGIT = 8


def estimate_classification(recipe: Recipe) -> MemoryEstimate:
    from distil.distill.objectives import ClassifierObjective
    from distil.distill.pair import Teacher
    from distil.models.vision import build_classifier
    from distil.pipelines.classification import _is_model_folder, teacher_folder

    shape, classes, n_train, n_test = VISION_SHAPES[recipe.data.name]
    per_example = 4 * math.prod(shape) + 8  # float32 image + int64 label
    cuda = recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())
    meta = torch.device("meta")

    def build(spec: object, what: str) -> nn.Module:
        try:
            with meta:
                return build_classifier(spec, shape, classes)  # type: ignore[arg-type]
        except (RuntimeError, ValueError, OverflowError, TypeError) as exc:  # e.g. a width beyond int64
            raise DistilError(f"{what}.model cannot be built: {_first_line(exc)}") from None

    def stage(name: str, model: nn.Module, teacher: nn.Module | None, distil: bool, spec: TrainSpec) -> StageEstimate:
        frozen = Teacher(teacher) if teacher is not None else None
        params = list(model.parameters())
        trainable = parameter_bytes(model, trainable=True)
        try:
            x = torch.empty((spec.batch_size, *shape), device=meta)
            y = torch.empty((spec.batch_size,), dtype=torch.long, device=meta)
            activations, widest = trace_saved(lambda: model(x), exclude=params)
            objective = ClassifierObjective(model, frozen if distil else None, recipe.loss, meta)
            try:
                with_loss = saved_tensor_bytes(lambda: objective.loss((x, y)), exclude=params)
            except (RuntimeError, NotImplementedError):  # a loss with data-dependent shapes (dkd) cannot run on meta
                # logits, log-softmaxes and probabilities of student and teacher at T and at 1
                with_loss = activations + LOSS_BUFFERS_PER_LOGIT * spec.batch_size * classes * 4
            n_eval = min(EVAL_BATCH, recipe.data.eval_size or n_test, n_test)
            evaluation = largest_inference_pair(model, torch.empty((n_eval, *shape), device=meta))
        except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
            raise DistilError(f"stage '{name}': cannot size its activations ({_first_line(exc)})") from None
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
    has_teacher = _is_model_folder(teacher_folder(recipe))
    if not has_teacher and recipe.teacher.train is not None:
        stages.append(stage("teacher", build(recipe.teacher.model, "teacher"), None, False, recipe.teacher.train))
    teacher = build(recipe.teacher.model, "teacher")
    for arm in recipe.arms:
        student = build(recipe.student.model, "student")
        stages.append(stage(arm, student, teacher, arm == "distilled", recipe.train))
    return MemoryEstimate("cuda" if cuda else "cpu", stages)


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return "a size does not fit in 64 bits" if "Overflow" in text else (text.splitlines() or [type(exc).__name__])[0]


# ------------------------------------------------------------------------------------------------------- dispatch
def _estimate_causal_lm(recipe: Recipe) -> MemoryEstimate:
    from distil.estimate_lm import estimate_causal_lm  # imports transformers: only for LM recipes

    return estimate_causal_lm(recipe)


ESTIMATORS: dict[str, Callable[[Recipe], MemoryEstimate]] = {
    "classification": estimate_classification,
    "causal_lm": _estimate_causal_lm,
}


def estimate_memory(recipe: Recipe) -> MemoryEstimate:
    """The memory estimate of `recipe`; DistilError when its task has no estimator yet."""
    estimator = ESTIMATORS.get(recipe.task)
    if estimator is None:
        raise DistilError(f"no memory estimate for task '{recipe.task}' yet")
    return estimator(recipe)


def available_memory() -> int | None:
    """Bytes of RAM this process may use: physical memory plus swap, capped by a cgroup limit; None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def memory_problems(recipe: Recipe) -> list[str]:
    """A pre-flight problem when the estimate cannot fit this machine (before any data or model is loaded)."""
    if recipe.task not in ESTIMATORS:
        return []
    try:
        estimate = estimate_memory(recipe)
    except DistilError as exc:
        return [str(exc)]
    peak = estimate.peak
    fix = ("lower train.batch_size (raise train.grad_accum to keep the effective batch) or use smaller models; "
           "`distil estimate RECIPE` shows where the memory goes")
    if estimate.device == "cuda":
        device_total = torch.cuda.get_device_properties(0).total_memory
        if peak.on(False) > device_total:
            return [f"memory estimate: '{peak.name}' needs {human(peak.on(False))} of GPU memory but the GPU has "
                    f"{human(device_total)}; {fix}"]
        need = peak.on(True)
    else:
        need = peak.total
    have = available_memory()
    if have is not None and need > have:
        return [f"memory estimate: '{peak.name}' needs {human(need)} of RAM but this machine has {human(have)}; {fix}"]
    return []
