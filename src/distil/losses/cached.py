"""The divergence between a student and a batch of cached teacher targets, whatever the cache's mode (top-k or
sampled); the sparse forms come from :mod:`distil.losses.registry`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from distil.errors import DistilError
from distil.losses.registry import DIVERGENCES, SPARSE_DIVERGENCES, Divergence, divergence_spec
from distil.losses.sparse import sampled_forward_kl

__all__ = ["cached_divergence"]


def cached_divergence(
    student_logits: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    *,
    divergence: str = "forward_kl",
    temperature: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    **divergence_params: float,
) -> torch.Tensor:
    """The divergence between the student and a batch of ``TeacherCache.targets(...)``, whatever the cache's mode.

    Positions without a target (``targets["mask"]``) are dropped, as are those ``mask`` drops. ``temperature`` None
    takes the cache's build temperature (``targets["temperature"]``); any other value must equal it.
    ``divergence_params`` are the divergence's parameters (``beta``); missing ones take the registry's defaults.
    """
    spec, params, temperature, targets = resolve_cached(targets, divergence, temperature, divergence_params,
                                                        student_logits.device)
    keep = targets["mask"]
    keep = keep if mask is None else keep & mask
    common = {"temperature": temperature, "mask": keep, "reduction": reduction}
    if "weights" in targets:
        return sampled_forward_kl(student_logits, targets["ids"], targets["weights"],
                                  teacher_entropy=targets.get("entropy"), **common)
    return spec.sparse(student_logits, targets.get("ids"), targets["logprobs"],
                       tail_logmass=targets.get("tail_logmass"), **common, **params)


def resolve_cached(targets: Mapping[str, torch.Tensor], divergence: str, temperature: float | None,
                   divergence_params: Mapping[str, float], device: torch.device
                   ) -> tuple[Divergence, dict[str, float], float, dict[str, torch.Tensor]]:
    """Check a divergence against a batch of cached targets: (its registry entry, its parameters, the temperature,
    the targets on ``device`` without the temperature). Shared with :mod:`distil.losses.fused_sparse`."""
    spec = divergence_spec(divergence) if divergence in DIVERGENCES else None
    if spec is None or spec.sparse is None:
        raise DistilError(f"divergence must be one of {', '.join(SPARSE_DIVERGENCES)}, got {divergence!r}")
    params = spec.resolve(divergence_params)
    built = float(targets["temperature"]) if "temperature" in targets else None
    if temperature is None:
        temperature = 1.0 if built is None else built
    elif built is not None and not math.isclose(temperature, built, rel_tol=1e-6):
        raise DistilError(f"the teacher cache holds targets at temperature {built:g}, this loss asks {temperature:g}; "
                          "sparse targets cannot be re-softened exactly: rebuild the cache at this temperature")
    if "weights" in targets and spec.name != "forward_kl":
        raise DistilError(f"a sampled cache gives unbiased forward KL only, not {divergence}; build a topk cache "
                          "for reverse KL or JSD")
    moved = {name: t.to(device, non_blocking=True) for name, t in targets.items() if name != "temperature"}
    return spec, params, temperature, moved
