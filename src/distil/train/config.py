"""What the training loop is told: plain dataclasses, built from a recipe's sections by distil.config.adapt or by
hand (distil.distill)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """One stage's optimisation: the optimizer and its schedule, accumulation, precision, and when to log,
    evaluate and checkpoint. (Batch size and data order belong to the stream, distil.data.stream.)"""

    steps: int
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw or sgd
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # constant, linear or cosine, after warmup_steps of linear warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float | None = 1.0
    precision: str = "auto"  # bf16 autocast only where the device runs it natively (distil.precision)
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None  # a final checkpoint is always written
    keep_checkpoints: int = 2
    max_nonfinite_skips: int = 0


@dataclass(frozen=True)
class ParallelConfig:
    """How a run under torchrun spreads over its processes (ignored in one process)."""

    strategy: str = "ddp"  # ddp or fsdp
    teacher: str = "replicate"  # replicate, shard or cpu_offload
    mixed_precision: str = "fp32"  # fsdp-sharded models: fp32 or bf16
    find_unused_parameters: bool = False
