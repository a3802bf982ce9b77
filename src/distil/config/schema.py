"""The recipe schema. A recipe is data: every choice is a name looked up in an explicit table, never code.

Every model forbids unknown keys, so a misspelt key is an error (with a suggestion), never a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from distil.config.data_schema import (  # noqa: F401  (re-exported: the data sections are part of the schema)
    DatasetColumns, DatasetData, DataSpec, ImageFolderData, LabelledData, SentenceData, Strict, TableData,
    TextColumns, TextData, TextsData, VisionData,
)
from distil.distill.feature_objective import ATTENTION_LOSSES, PROJECTED_LOSSES
from distil.losses.registry import DIVERGENCES


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


class HFModelSpec(Strict):
    """A Hugging Face model: a local folder or a built-in source name (e.g. smollm2-135m-instruct)."""

    arch: Literal["hf"]
    source: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="None keeps the saved dtype; auto: bfloat16 where bf16 is native (and train.precision "
        "resolves to bf16), else float32")
    trust_remote_code: bool = False


class FromTeacherSpec(Strict):
    """A student built from the teacher by distil.students.make_student, with inherited weights."""

    arch: Literal["from_teacher"]
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="teacher layers to copy, in order")
    num_layers: int | None = Field(None, gt=0, description="or: this many layers spread evenly (first and last kept)")
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    calibration_batches: int = Field(0, ge=0, description="rank width by activations on N training batches")

    @model_validator(mode="after")
    def _one_depth_choice(self) -> FromTeacherSpec:
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give either layers or num_layers, not both")
        return self


ModelSpec = Annotated[Union[MLPSpec, CNNSpec, HFModelSpec, FromTeacherSpec], Field(discriminator="arch")]


# ------------------------------------------------------------------------------------------------------------ train
class TrainSpec(Strict):
    """One training stage's budget and optimisation settings."""

    steps: int = Field(gt=0)
    batch_size: int = Field(64, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    subset: int | None = Field(None, gt=0, description="train on the first N examples of a seeded shuffle; None = all")
    labelled: int | None = Field(None, gt=0, description="classification: labels of the first N examples of that "
                                 "shuffle only; arms with a teacher use every example as the transfer set, the others "
                                 "only the labelled ones")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr (linear/cosine)")
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the device runs bf16 natively (CUDA, CPUs with AVX-512-BF16 "
        "or AMX), else fp32")
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
FeatureLossName = Literal[
    "mse", "cosine", "fitnets", "at", "attention_kl", "minilm_relations", "rkd_distance", "rkd_angle"
]


class FeatureTermSpec(Strict):
    """One intermediate-layer term of the `distilled` arm: weight * loss(student module, teacher module).

    `student` / `teacher` are module names from `model.named_modules()` or glob patterns (`*` within one dotted
    component, `**` across), paired in order. A name with `{}` is a layer template (`encoder.layer.{}`): its layers
    are paired by `layers` (uniform, last_of_block, or explicit [student, teacher] pairs). Attention terms name
    attention modules (`model.layers.{}.self_attn`, `encoder.layer.{}.attention.self`)."""

    student: str = Field(min_length=1)
    teacher: str = Field(min_length=1)
    loss: FeatureLossName
    weight: float = Field(1.0, ge=0.0)
    layers: Literal["uniform", "last_of_block"] | list[tuple[int, int]] | None = Field(
        None, description="layer templates only: the student-to-teacher layer mapping (default uniform)")
    projector: Literal["auto", "always", "never"] | None = Field(
        None, description="mse/cosine/fitnets: auto (when shapes differ; fitnets: always), always or never")
    capture: Literal["output", "input"] = "output"
    p: float = Field(2.0, gt=0, description="at: the exponent of the attention map")
    head_map: Literal["average", "per_head"] = Field("average", description="attention_kl: how heads are matched")
    num_relation_heads: int | None = Field(None, gt=0, description="minilm_relations: default the student's heads")

    @model_validator(mode="after")
    def _consistent(self) -> FeatureTermSpec:
        templates = (self.student.count("{}"), self.teacher.count("{}"))
        if templates not in ((0, 0), (1, 1)):
            raise ValueError(f"student and teacher must both be layer templates with one '{{}}' or both plain names, "
                             f"got {self.student!r} and {self.teacher!r}")
        if self.layers is not None and templates == (0, 0):
            raise ValueError("layers applies to layer templates only: write the names with '{}', e.g. encoder.layer.{}")
        if self.projector is not None and self.loss not in PROJECTED_LOSSES:
            raise ValueError(f"projector applies to {', '.join(PROJECTED_LOSSES)} only, not {self.loss}")
        if self.num_relation_heads is not None and self.loss != "minilm_relations":
            raise ValueError("num_relation_heads applies to minilm_relations only")
        if self.capture == "input" and self.loss in ATTENTION_LOSSES:
            raise ValueError(f"{self.loss} reads attention modules' projections; capture: input does not apply")
        return self


# Every divergence of the losses registry, and DKD (a label-aware classifier loss that carries T^2 itself).
DivergenceName = Literal[(*DIVERGENCES, "dkd")]  # type: ignore[valid-type]


class LossSpec(Strict):
    """How the student learns from the teacher.

    total = alpha * [T^2] * divergence(student, teacher; T) + (1 - alpha) * CE(student, labels).
    alpha weights the teacher's soft term. With divergence "dkd", the soft term is DKD (which carries T^2 itself).
    """

    divergence: DivergenceName = "forward_kl"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the teacher's soft term")
    temperature: float = Field(2.0, gt=0.0)
    scale_by_t2: bool = Field(True, description="multiply the soft term by T^2 (Hinton et al.)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="generalized_jsd: 0 = forward KL, 1 = reverse KL")
    skew: float = Field(0.1, ge=0.0, le=1.0, description="skew_kl / skew_reverse_kl mixing weight")
    dkd_alpha: float = Field(1.0, ge=0.0, description="DKD target-class weight")
    dkd_beta: float = Field(8.0, ge=0.0, description="DKD non-target-class weight")
    fused: bool = Field(True, description="LMs: chunked LM-head losses, never materialising [tokens, vocab] logits")
    chunk_size: int | None = Field(None, gt=0, description="LMs: tokens per chunk of the fused path; None = auto")
    cross_tokenizer: Literal["mapped_kl", "uld"] = Field(
        "mapped_kl", description="causal LMs with two tokenizers: the soft term at character-aligned positions, the "
        "vocabulary-mapped KL (equal-string tokens, ULD on the rest) or ULD alone (distil.losses.cross_vocab)")
    uld_top_k: int | None = Field(1024, gt=0, description="ULD ranks each distribution's top k probabilities, the "
                                  "rest by its mass (low by at most twice the smaller tail); null = all")
    features: list[FeatureTermSpec] = Field(
        default=[], description="feature / attention / relation terms added to the `distilled` arm's loss")
    embedding: Literal["cosine", "mse"] = Field(
        "cosine", description="task embedding: the output term between the pooled, L2-normalised sentence embeddings")


class OnPolicySpec(Strict):
    """GKD (Agarwal et al. 2024): with probability lmbda a step trains on continuations sampled from the student.

    The choice is made once per optimizer step, from `start_step` on (the steps before are an off-policy warm-up). An
    example's prompt is its untrained prefix (chat, prompt_completion data); a text block's is its first
    `prompt_tokens` tokens. The student samples up to `max_new_tokens` (stopping at EOS); the teacher scores them;
    only the soft term (the recipe's divergence) is applied to those tokens. lmbda = 0 is plain logit KD."""

    lmbda: float = Field(0.5, ge=0.0, le=1.0)
    prompt_tokens: int = Field(32, gt=0, description="text blocks: tokens of each block given as the prompt")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, gt=0)
    start_step: int = Field(0, ge=0, description="off-policy warm-up: on-policy steps begin at this optimizer step")


class GenerateSpec(Strict):
    """Response distillation: the teacher answers prompts; the student is fine-tuned on (prompt, response)."""

    prompts: str = Field("corpus", description="a JSONL file with a 'prompt' field, or 'corpus' (passages of data.train)")
    num_prompts: int = Field(64, gt=0)
    eval_prompts: int = Field(16, ge=0, description="held-out prompts (from data.eval) answered for evaluation")
    prompt_lines: int = Field(4, gt=0, description="corpus prompts: lines of text per passage")
    instruction: str = Field("Continue this passage from Shakespeare in the same style:\n\n")
    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(8, gt=0)
    chat_template: bool = Field(True, description="wrap prompts in the tokenizer's chat template when it has one")
    verify: bool = Field(False, description="keep a teacher answer only where it passes its prompt's tests (data "
                                            "rows with HumanEval's prompt, test and entry_point); a failing one is "
                                            "replaced by the prompt's reference answer")


class BenchmarkSpec(Strict):
    """causal_lm: a benchmark scored by running each model's greedy completions of the held-out rows (teacher, the
    student before training, every arm); distil.measure.benchmark."""

    name: Literal["humaneval"] = Field("humaneval", description="pass@1 of HumanEval-style rows (prompt, test, "
                                      "entry_point)")
    problems: int | None = Field(None, gt=0, description="held-out problems scored; default all")
    max_new_tokens: int = Field(384, gt=0)
    batch_size: int = Field(8, gt=0)
    timeout_s: float = Field(10.0, gt=0, description="seconds each program may run its tests")


# ------------------------------------------------------------------------------------------------------ distributed
class DistributedSpec(Strict):
    """How a run launched by torchrun (or accelerate launch) spreads over its processes; ignored in one process.

    train.batch_size is per process: N processes with batch b train like one process with batch N*b."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="the student: replicated with DDP, or its parameters, gradients and optimizer state "
        "sharded with FSDP2 (fully_shard)")
    teacher: Literal["replicate", "shard", "cpu_offload"] = Field(
        "replicate", description="a full frozen copy on every device; sharded across the processes (FSDP2, gathered "
        "layer by layer while it runs); or sharded and kept in CPU memory between uses")
    mixed_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="FSDP-sharded models: compute and gather parameters in bf16, reduce gradients in fp32")
    find_unused_parameters: bool = Field(False, description="DDP: allow trained parameters that get no gradient")


# ---------------------------------------------------------------------------------------------------------- parties
class CacheSpec(Strict):
    """An offline teacher cache: built once by `distil cache build` (or the first run), then read instead of the teacher."""

    path: str = Field(min_length=1)
    # The default is the measured one (benchmarks/cache.md): on the flagship, top-k caches trained 7-13% worse than
    # the live teacher at every k from 8 to 64, sampled ones within noise of it; 32 systematic draws have the variance
    # of 64 independent ones at 70 instead of 105 bytes per token. Sampled targets suit forward KL only.
    mode: Literal["topk", "sample"] = Field("sample", description="sampled ids (unbiased, forward KL only), or top-k "
                                                                  "ids + log-probs + tail mass (every divergence)")
    k: int = Field(64, gt=0, description="topk: ids kept per position")
    num_draws: int = Field(32, gt=0, description="sample: draws per position (Sparse Logit Sampling)")
    sampling: Literal["multinomial", "systematic"] = Field(
        "systematic", description="sample: evenly spaced draws from one random offset (each token drawn within one "
                                  "of n times its probability), or independent draws (more variance, fewer ids)")
    shard_size: int = Field(1024, gt=0, description="samples per shard file")
    batch_size: int = Field(8, gt=0, description="teacher batch size while building")


class LoraSpec(Strict):
    """LoRA (task causal_lm, the peft library): only low-rank adapters on the linear layers of a student (or of the
    teacher in its teacher stage) train and are checkpointed; the saved model has them merged into a plain one."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scale: the update is B A * alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="module names (suffixes) that get adapters; all-linear: every linear but the head")
    save_adapter: bool = Field(False, description="also save the adapter alone (peft format) in the arm's adapter/")


class TeacherSpec(Strict):
    model: ModelSpec
    cache: CacheSpec | None = Field(None, description="causal_lm: train from an offline cache of this teacher's outputs")
    checkpoint: str | None = Field(
        None, description="teacher weights (.safetensors); trained by the recipe's teacher stage when missing"
    )
    train: TrainSpec | None = Field(None, description="budget of the teacher stage (needed when no checkpoint exists); "
                                    "causal_lm: the teacher is first fine-tuned on the training data (CE)")
    lora: LoraSpec | None = Field(None, description="causal_lm teacher stage: train adapters only (merged after)")
    seed: int | None = Field(None, description="seed of the teacher stage; None = the recipe's seed")


class MultiTeacherSpec(Strict):
    """Several teachers for the `distilled` arm: `teacher` (teacher 0, the one feature terms read) plus these."""

    teachers: list[TeacherSpec] = Field(min_length=1)
    combine: Literal["mixture", "per_teacher"] = Field(
        "mixture", description="mixture: one target, the weighted average of the teachers' softened probabilities; "
                               "per_teacher: one soft term per teacher, weighted")
    weights: list[Annotated[float, Field(ge=0)]] | None = Field(None, description="one per teacher; None = equal")


class BornAgainSpec(Strict):
    """Born-again networks (Furlanello et al. 2018): generation k learns from generation k-1, same architecture.

    Generation 0 is the student trained alone (the `student_alone` arm when the recipe has it)."""

    generations: int = Field(2, ge=1, description="generations distilled after generation 0")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="None = loss.alpha")
    temperature: float | None = Field(None, gt=0.0, description="None = loss.temperature")


class DeepSupervisionSpec(Strict):
    """Be Your Own Teacher (Zhang et al. 2019): exits on shallower blocks learn from the deepest exit."""

    exits: list[str] | None = Field(None, description="module names whose outputs get an exit; None = every block "
                                                      "but the last")
    alpha: float = Field(0.3, ge=0.0, le=1.0, description="shallow exits: weight of the deepest exit's soft term")
    temperature: float = Field(3.0, gt=0.0)
    feature_weight: float = Field(0.03, ge=0.0, description="shallow exits: weight of the hint to the deepest features")


class EMASpec(Strict):
    """Mean teacher: an exponential moving average of the student's weights teaches the student."""

    decay: float = Field(0.99, ge=0.0, lt=1.0)
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="None = loss.alpha")
    temperature: float | None = Field(None, gt=0.0, description="None = loss.temperature")


class SelfDistillSpec(Strict):
    born_again: BornAgainSpec = BornAgainSpec()
    deep_supervision: DeepSupervisionSpec = DeepSupervisionSpec()
    ema: EMASpec = EMASpec()


class StudentSpec(Strict):
    model: ModelSpec
    freeze_embeddings: bool = Field(
        False, description="LMs and encoders: keep the (inherited) token embeddings and a tied LM head fixed: less "
                           "compute and memory"
    )
    lora: LoraSpec | None = Field(None, description="causal_lm: train LoRA adapters instead of every weight")


Arm = Literal["student_alone", "logit_kd", "distilled", "born_again", "deep_supervision", "ema"]
# student_alone: hard labels only (task embedding: contrastive word-definition pairs). logit_kd: the loss section's
# logit term only (task embedding: the sentence-embedding term only). distilled: the recipe's whole loss -- logit term,
# feature terms, every teacher of multi_teacher. The rest are self-distillation (classification only).
SELF_DISTILL_ARMS = ("born_again", "deep_supervision", "ema")
TEACHER_ARMS = ("logit_kd", "distilled")


RESPONSE_METHODS = ("response", "response_logits")  # the methods that train on the teacher's answers


class Recipe(Strict):
    """A whole distillation run: data, teacher, student, loss, training budget and the arms to compare."""

    name: str = Field(min_length=1)
    description: str = ""
    task: Literal["classification", "causal_lm", "embedding"]
    method: Literal["logits", "response", "response_logits"] = Field(
        "logits", description="causal_lm: token-level logit KD (optionally on-policy); response distillation (the "
        "student fine-tuned on the teacher's answers); or both (its answers as data, its logits on them as the soft "
        "term, weighted by loss.alpha)"
    )
    seed: int = 0
    output_dir: str | None = Field(None, description="run directory; default runs/<name>-<timestamp>")
    data: DataSpec
    teacher: TeacherSpec
    student: StudentSpec
    loss: LossSpec = LossSpec()
    train: TrainSpec
    onpolicy: OnPolicySpec | None = None
    generate: GenerateSpec | None = None
    benchmark: BenchmarkSpec | None = None
    multi_teacher: MultiTeacherSpec | None = None
    self_distill: SelfDistillSpec = SelfDistillSpec()
    arms: list[Arm] = Field(default=["student_alone", "distilled"], min_length=1)
    latency_runs: int = Field(30, gt=0, description="timed forward passes per latency measurement (language models: "
                              "timed generations, at most 2)")
    generations_shown: int = Field(3, ge=0, description="causal_lm: held-out prompts generated side by side")
    distributed: DistributedSpec = DistributedSpec()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        """Rules of every task; each task's own rules are in its module (distil.tasks), checked by validate_recipe."""
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms has duplicates: {self.arms}")
        if self.benchmark is not None and self.task != "causal_lm":
            raise ValueError("benchmark (HumanEval pass@1) applies to task causal_lm; remove it")
        if self.teacher.model.arch == "from_teacher":
            raise ValueError("teacher.model.arch cannot be from_teacher; use arch: hf with a source")
        if self.loss.features and "distilled" not in self.arms:
            raise ValueError("loss.features apply to the distilled arm; add distilled to arms")
        if self.multi_teacher is not None:
            n = 1 + len(self.multi_teacher.teachers)
            if self.multi_teacher.weights is not None and len(self.multi_teacher.weights) != n:
                raise ValueError(f"multi_teacher.weights needs {n} weights (teacher, then each of multi_teacher."
                                 f"teachers), got {len(self.multi_teacher.weights)}")
            if "distilled" not in self.arms:
                raise ValueError("multi_teacher applies to the distilled arm; add distilled to arms")
        dist = self.distributed
        if dist.mixed_precision == "bf16" and dist.strategy == "ddp" and dist.teacher == "replicate":
            raise ValueError("distributed.mixed_precision applies to FSDP-sharded models (strategy fsdp, or teacher "
                             "shard/cpu_offload); with ddp use train.precision: bf16 (autocast)")
        return self
