"""Recipe sections -> the library's plain components: the pydantic schema stops here."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from distil.config.schema import (
    BenchmarkSpec, BornAgainSpec, DistributedSpec, EMASpec, FeatureTermSpec, GenerateSpec, LoraSpec, LossSpec, OnPolicySpec,
    TrainSpec,
)
from distil.distill.feature_objective import FeatureTerm
from distil.distill.lm import OnPolicy
from distil.distill.objectives import LogitLoss
from distil.generate import Sampling
from distil.measure.benchmark import Benchmark
from distil.models.lora import Lora
from distil.train.config import ParallelConfig, TrainConfig


def _copy(spec: Any, cls: type) -> Any:
    return cls(**{f.name: getattr(spec, f.name) for f in fields(cls)})


def train_config(spec: TrainSpec) -> TrainConfig:
    return _copy(spec, TrainConfig)


def parallel_config(spec: DistributedSpec) -> ParallelConfig:
    return _copy(spec, ParallelConfig)


def logit_loss(spec: LossSpec) -> LogitLoss:
    """The loss section as the objectives read it (its feature terms go to distil.distill.feature_objective)."""
    return _copy(spec, LogitLoss)


def self_distill_loss(loss: LossSpec, section: BornAgainSpec | EMASpec) -> LogitLoss:
    """The loss section with a self-distillation section's alpha and temperature, where it gives them."""
    changes = {k: v for k, v in (("alpha", section.alpha), ("temperature", section.temperature)) if v is not None}
    return replace(logit_loss(loss), **changes)


def sampling(spec: GenerateSpec) -> Sampling:
    return Sampling(**{f.name: getattr(spec, f.name) for f in fields(Sampling) if f.name != "stop"})  # no stops


def benchmark(spec: BenchmarkSpec) -> Benchmark:
    return _copy(spec, Benchmark)


def onpolicy(spec: OnPolicySpec | None) -> OnPolicy | None:
    return None if spec is None else _copy(spec, OnPolicy)


def feature_terms(specs: list[FeatureTermSpec]) -> list[FeatureTerm]:
    return [_copy(spec, FeatureTerm) for spec in specs]


def lora(spec: LoraSpec) -> Lora:
    targets = spec.target_modules
    return Lora(r=spec.r, alpha=spec.alpha, dropout=spec.dropout,
                target_modules=targets if isinstance(targets, str) else tuple(targets))
