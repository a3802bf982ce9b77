"""Every divergence once: its plain function, its fused LM-head kernel, its sparse form (cached teacher targets) and
its parameters with their defaults. The recipe schema, :mod:`distil.losses.fused`, :mod:`distil.losses.cached` and the
objectives read this table; a new divergence is its functions plus one entry here.

The plain functions share ``f(student_logits, teacher_logits, *, temperature, mask, reduction, **params)``; the
sparse forms ``f(student_logits, target_ids, target_logprobs, *, tail_logmass, temperature, mask, reduction,
**params)``; the kernels are described in :mod:`distil.losses.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from distil.errors import DistilError
from distil.losses import kernels
from distil.losses.logits import forward_kl, generalized_jsd, reverse_kl, skew_kl, skew_reverse_kl, tvd
from distil.losses.sparse import sparse_forward_kl, sparse_jsd, sparse_reverse_kl

__all__ = ["ALIASES", "DIVERGENCES", "Divergence", "REGISTRY", "SPARSE_DIVERGENCES", "divergence_spec"]


@dataclass(frozen=True)
class Divergence:
    """One divergence between the softened student and teacher distributions (no T**2 factor inside)."""

    name: str
    plain: Callable[..., torch.Tensor]
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    sparse: Callable[..., torch.Tensor] | None = None  # None: no form for top-k / sampled cached targets
    params: Mapping[str, float] = field(default_factory=dict)  # parameter -> default (each lies in [0, 1])

    def resolve(self, given: Mapping[str, float]) -> dict[str, float]:
        """The defaults updated by ``given``; an unknown or out-of-range parameter is a DistilError."""
        unknown = set(given) - set(self.params)
        if unknown:
            accepted = ", ".join(sorted(self.params)) or "only temperature"
            raise DistilError(f"{self.name} takes no parameter {', '.join(sorted(unknown))}; it accepts {accepted}")
        values = {**self.params, **given}
        for name, value in values.items():
            if not 0.0 <= value <= 1.0:
                raise DistilError(f"{name} must lie in [0, 1], got {value}; pick a value between 0 and 1")
        return values


REGISTRY: dict[str, Divergence] = {
    d.name: d for d in (
        Divergence("forward_kl", forward_kl, kernels.forward_kl_kernel, sparse_forward_kl),
        Divergence("reverse_kl", reverse_kl, kernels.reverse_kl_kernel, sparse_reverse_kl),
        Divergence("generalized_jsd", generalized_jsd, kernels.jsd_kernel, sparse_jsd, {"beta": 0.5}),
        Divergence("skew_kl", skew_kl, kernels.skew_kl_kernel, None, {"alpha": 0.1}),
        Divergence("skew_reverse_kl", skew_reverse_kl, kernels.skew_reverse_kl_kernel, None, {"alpha": 0.1}),
        Divergence("tvd", tvd, kernels.tvd_kernel),
    )
}
ALIASES = {"jsd": "generalized_jsd"}

DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    name: REGISTRY[ALIASES.get(name, name)].plain for name in (*REGISTRY, *ALIASES)
}
"""Name (or alias) -> plain divergence function."""

SPARSE_DIVERGENCES = tuple(name for name in DIVERGENCES if REGISTRY[ALIASES.get(name, name)].sparse is not None)


def divergence_spec(name: str) -> Divergence:
    """The registry entry of a divergence name or alias."""
    found = REGISTRY.get(ALIASES.get(name, name))
    if found is None:
        raise DistilError(f"unknown divergence {name!r}; choose one of {', '.join(sorted(DIVERGENCES))}")
    return found
