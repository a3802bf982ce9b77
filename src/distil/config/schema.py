"""The recipe schema. A recipe is data: every choice is a name looked up in an explicit table, never code.

Every model forbids unknown keys, so a misspelt key is an error (with a suggestion), never a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator



class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------------------- models
class MLPSpec(Strict):
    """A multilayer perceptron over flattened inputs."""

    arch: Literal["mlp"]
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = [128]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class CNNSpec(Strict):
    """A small convolutional net: conv-BN-ReLU-pool blocks, then a hidden linear layer."""

    arch: Literal["cnn"]
    channels: list[Annotated[int, Field(gt=0)]] = Field(default=[32, 64], min_length=1)
    hidden_size: int = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


ModelSpec = Annotated[Union[MLPSpec, CNNSpec], Field(discriminator="arch")]


# ------------------------------------------------------------------------------------------------------------- data
class VisionData(Strict):
    """An image classification dataset from an explicit table of built-in sources."""

    kind: Literal["vision"] = "vision"
    name: Literal["fashion-mnist", "digits"]
    path: str | None = Field(None, description="folder holding the dataset files; None = the source's default")
    eval_size: int | None = Field(None, gt=0, description="evaluate on the first N test examples; None = all")


def _data_kind(value: object) -> str:
    # `kind` may be left out of a vision dataset: it is the default.
    if isinstance(value, dict):
        return str(value.get("kind", "vision"))
    return str(getattr(value, "kind", "vision"))


DataSpec = Annotated[Union[Annotated[VisionData, Tag("vision")]], Discriminator(_data_kind)]


# ------------------------------------------------------------------------------------------------------------ train
class TrainSpec(Strict):
    """One training stage's budget and optimisation settings."""

    steps: int = Field(gt=0)
    batch_size: int = Field(64, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    subset: int | None = Field(None, gt=0, description="train on the first N examples of a seeded shuffle; None = all")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr (linear/cosine)")
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps; a final one is always written")
    keep_checkpoints: int = Field(2, gt=0)
    max_nonfinite_skips: int = Field(0, ge=0, description="skip up to N non-finite steps in a row instead of stopping")

    @model_validator(mode="after")
    def _warmup_within_budget(self) -> TrainSpec:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self


# ------------------------------------------------------------------------------------------------------------- loss
class LossSpec(Strict):
    """How the student learns from the teacher.

    total = alpha * [T^2] * divergence(student, teacher; T) + (1 - alpha) * CE(student, labels).
    alpha weights the teacher's soft term. With divergence "dkd", the soft term is DKD (which carries T^2 itself).
    """

    divergence: Literal[
        "forward_kl", "reverse_kl", "generalized_jsd", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "dkd"
    ] = "forward_kl"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the teacher's soft term")
    temperature: float = Field(2.0, gt=0.0)
    scale_by_t2: bool = Field(True, description="multiply the soft term by T^2 (Hinton et al.)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="generalized_jsd: 0 = forward KL, 1 = reverse KL")
    skew: float = Field(0.1, ge=0.0, le=1.0, description="skew_kl / skew_reverse_kl mixing weight")
    dkd_alpha: float = Field(1.0, ge=0.0, description="DKD target-class weight")
    dkd_beta: float = Field(8.0, ge=0.0, description="DKD non-target-class weight")


# ---------------------------------------------------------------------------------------------------------- parties
class TeacherSpec(Strict):
    model: ModelSpec
    checkpoint: str | None = Field(
        None, description="teacher weights (.safetensors); trained by the recipe's teacher stage when missing"
    )
    train: TrainSpec | None = Field(None, description="budget of the teacher stage (needed when no checkpoint exists)")


class StudentSpec(Strict):
    model: ModelSpec


Arm = Literal["student_alone", "distilled"]


class Recipe(Strict):
    """A whole distillation run: data, teacher, student, loss, training budget and the arms to compare."""

    name: str = Field(min_length=1)
    description: str = ""
    task: Literal["classification"]
    seed: int = 0
    output_dir: str | None = Field(None, description="run directory; default runs/<name>-<timestamp>")
    data: DataSpec
    teacher: TeacherSpec
    student: StudentSpec
    loss: LossSpec = LossSpec()
    train: TrainSpec
    arms: list[Arm] = Field(default=["student_alone", "distilled"], min_length=1)
    latency_runs: int = Field(30, gt=0, description="timed forward passes per latency measurement")

    @model_validator(mode="after")
    def _unique_arms(self) -> Recipe:
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms has duplicates: {self.arms}")
        return self
