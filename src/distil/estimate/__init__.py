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
the estimate (method in its docstring). The tensors are counted in fp32: under bf16 autocast (train.precision bf16,
or auto on a CPU or GPU that runs bf16 natively) autocast's bf16 copies of weights and activations come on top and
are not modelled yet (a digits MLP at batch 1024 measured 130 MB above its baseline against 97 MB estimated, on an
AMD EPYC with AVX-512-BF16, 2026-12-02).

Extension point: each task's `estimate(recipe)` (distil.tasks) returns its MemoryEstimate, or None: a task without
one gets no estimate and no memory pre-flight check. For `causal_lm` the estimator should build teacher and student from
their configs on the meta device (`with torch.device("meta"): AutoModelForCausalLM.from_config(cfg)`) and report:
teacher weights in their dtype; student weights, gradients and fp32 AdamW states (`parameter_bytes`); activations
from `saved_tensor_bytes` on a meta batch of `batch_size x max_length` (or per-layer hidden x tokens x a small factor
when a model does not run on meta); and the logits buffers -- the full `tokens x vocab` fp32 logits of student and
teacher and their log-softmaxes when the loss is not chunked, `chunk_size x vocab` per chunk when it is.
"""

from __future__ import annotations

import torch

from distil.config.schema import Recipe
from distil.errors import DistilError
from distil.estimate.memory import (EstimateUnavailable, MemoryEstimate, MemoryItem, StageEstimate, available_memory,
                                    human, parameter_bytes, saved_tensor_bytes, trace_saved)

__all__ = ["EstimateUnavailable", "MemoryEstimate", "MemoryItem", "StageEstimate", "estimate_memory",
           "memory_problems", "parameter_bytes", "saved_tensor_bytes", "trace_saved"]


# Measured on digits-kd runs (tests/reliability/test_estimate.py, 2026-11-29): peak RSS 1.15-1.31x the tensors.
HEAP_SLACK = 0.15


def _task_estimate(recipe: Recipe) -> MemoryEstimate | None:
    from distil.tasks import task_of  # the tasks build on this package's tools: look them up when asked

    estimator = task_of(recipe.task).estimate
    return None if estimator is None else estimator(recipe)


def estimate_memory(recipe: Recipe, estimate: MemoryEstimate | None = None) -> MemoryEstimate:
    """The memory estimate of `recipe`; DistilError when its task has no estimator yet."""
    estimate = estimate or _task_estimate(recipe)
    if estimate is None:
        raise DistilError(f"no memory estimate for task '{recipe.task}' yet")
    if estimate.device == "cpu":  # glibc keeps freed chunks it cannot return: the tensors cost more than their bytes
        for stage in estimate.stages:
            stage.items.append(MemoryItem("heap fragmentation", int(HEAP_SLACK * stage.total),
                                          f"{HEAP_SLACK:.0%} of the tensors above"))
    return estimate


def memory_problems(recipe: Recipe) -> list[str]:
    """A pre-flight problem when the estimate cannot fit this machine (before any data or model is loaded)."""
    try:
        estimate = _task_estimate(recipe)
        if estimate is None:
            return []
        estimate = estimate_memory(recipe, estimate)
    except EstimateUnavailable:
        return []  # e.g. a model not converted yet: the run goes ahead, `distil estimate` says why
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
