"""Token-level distillation of causal LMs: next-token CE plus a divergence to the teacher, optionally on-policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from distil.data.formats import IGNORE, Example, prompt_length
from distil.data.packing import model_inputs, padded_batch
from distil.distill.objectives import LogitLoss, divergence_params, soft_term
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.losses import fused_linear_cross_entropy, fused_linear_divergence
from distil.losses.fused_kd import fused_linear_kd_and_ce
from distil.train import distributed
from distil.train.objective import Objective, teacher_models


@dataclass(frozen=True)
class OnPolicy:
    """GKD's on-policy steps: from optimizer step `start_step` on, with probability lmbda a whole step's batches
    become the student's own continuations of their prompts (up to max_new_tokens, sampled at temperature, top_k,
    stopping at EOS), scored by the soft term only.

    An example's prompt is its untrained prefix (chat and prompt_completion data: everything before the first trained
    token); a text block, trained on every token, is prompted with its first prompt_tokens tokens."""

    lmbda: float = 0.5
    prompt_tokens: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    start_step: int = 0  # off-policy warm-up: the steps before this one are never on-policy


def sample_continuations(student: nn.Module, prompts: list[list[int]], spec: OnPolicy, pad: int,
                         device: torch.device) -> list[list[int]]:
    """The student's sampled continuation of each prompt (token ids), up to and with its first EOS."""
    width = max(len(p) for p in prompts)
    left = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        sequences = student.generate(
            input_ids=left, attention_mask=attention, do_sample=True, temperature=spec.temperature,
            top_k=spec.top_k or 0, top_p=1.0, max_new_tokens=spec.max_new_tokens, pad_token_id=pad, use_cache=True,
        )
    student.train(was_training)
    eos = set(eos_ids(student))
    return [next((row[: i + 1] for i, token in enumerate(row) if token in eos), row)
            for row in sequences[:, width:].tolist()]


def fused_problem(model: nn.Module, who: str, inputs: dict[str, torch.Tensor]) -> str | None:
    """Why the fused path cannot compute this model's logits as ``hidden @ lm_head.weight.T`` (None when it can).

    Checked by name (soft-capping, a logit scale) and numerically on a slice of a real batch, since models rescale
    their logits under many names (Granite's logits_scaling, FalconH1's lm_head_multiplier: KD values 64x off)."""
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
        if getattr(config, key, None) not in (None, 1.0):
            return f"the {who} rescales its logits ({key}={getattr(config, key)})"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return f"the {who} has no bias-free linear LM head"
    inputs = {key: value[:1, :16] for key, value in inputs.items()}
    was_training = model.training
    model.eval()  # no dropout: the two forward passes below must see the same network
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits.float()
            expected = F.linear(final_hidden(model, inputs).to(head.weight.dtype), head.weight).float()
    finally:
        model.train(was_training)
    # The same product in the model's dtype agrees to rounding (bf16: about 0.4% of the largest logit); a rescaled
    # or post-processed head is off by far more than 1%.
    worst = float((logits - expected).abs().max())
    if worst > 1e-2 * float(expected.abs().max()) + 1e-6:
        return f"the {who}'s logits are not hidden @ lm_head.weight.T (max difference {worst:.3g})"
    return None


def fused_or_note(problem: str | None, losses: str) -> bool:
    """Whether the fused path applies (no problem); otherwise says, on the main process, why `losses` take the plain
    path instead."""
    if problem and distributed.is_main():
        Console(stderr=True, highlight=False).print(
            f"note: {problem}; {losses} take the plain path (full logits) instead of the fused one", soft_wrap=True)
    return problem is None


def final_hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states after the final norm, i.e. what the LM head multiplies (no logits are computed); `inputs`:
    input_ids with attention_mask, or packed input_ids with position_ids (distil.data.packing.model_inputs)."""
    out = model.base_model(**inputs, use_cache=False)
    return out.last_hidden_state


def example_prompt(ids: list[int], labels: list[int], prompt_tokens: int, length: int) -> list[int]:
    """The untrained prefix of an example (`length` real tokens), or its first prompt_tokens tokens when its first
    token is trained on (a text block)."""
    first = prompt_length(labels[:length])
    return ids[: first if first > 0 else min(prompt_tokens, length - 1)]


def eos_ids(model: nn.Module) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: (targets [B, L-1], mask of positions that count)."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE


class CausalLMObjective(Objective):
    """alpha * [T^2] * divergence + (1 - alpha) * next-token CE over label positions; CE alone without a teacher.

    On-policy batches (see `prepare`) train on the student's own samples with the soft term only, as in GKD."""

    unit = "tokens"

    def __init__(
        self,
        student: nn.Module,
        teacher: Teacher | None,
        spec: LogitLoss,
        *,
        vocab_size: int,
        device: torch.device,
        onpolicy: OnPolicy | None = None,
        pad_token_id: int | None = None,
    ):
        self.student, self.teacher, self.spec, self.device = student, teacher, spec, device
        self.vocab_size, self.onpolicy, self.pad_token_id = vocab_size, onpolicy, pad_token_id
        self.modules = {"student": student}
        self.fused: bool | None = None if spec.fused else False  # None: decided on the first batch

    def _use_fused(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Once, on the first batch: the fused path where both heads are plain linear maps, else the plain one."""
        if self.fused is None:
            models = [("student", self.student)] + ([("teacher", self.teacher.model)] if self.teacher else [])
            problem = next((p for who, m in models if (p := fused_problem(m, who, inputs))), None)
            self.fused = fused_or_note(problem, "the LM losses")
        return self.fused

    def teachers(self) -> dict[str, nn.Module]:
        return teacher_models(teacher=self.teacher)

    def weight(self, batch: dict[str, Any]) -> int:
        return int(next_token_targets(batch["labels"])[1].sum())

    def prepare(self, batches: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """With probability lmbda (decided once per optimizer step), replace every micro-batch by student samples."""
        spec = self.onpolicy
        if spec is None or self.teacher is None or step < spec.start_step or not bool(torch.rand(()) < spec.lmbda):
            return batches
        return [self._sample(batch) for batch in batches]

    def _sample(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's prompts continued by the student; only the sampled tokens (up to and with EOS) are scored."""
        spec = self.onpolicy
        assert spec is not None
        if batch.get("position_ids") is not None:
            raise DistilError("on-policy sampling needs one example per row: set data.packing to false")
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * len(ids)
        prompts = [example_prompt(row, labels, spec.prompt_tokens, int(n))
                   for row, labels, n in zip(ids.tolist(), batch["labels"].tolist(), lengths)]
        pad = self.pad_token_id if self.pad_token_id is not None else eos_ids(self.student)[0]
        examples = [Example(prompt + sampled, [IGNORE] * len(prompt) + sampled)
                    for prompt, sampled in zip(prompts, sample_continuations(self.student, prompts, spec, pad,
                                                                             self.device))]
        return {**padded_batch(examples, pad), "onpolicy": True}  # right-padded again, as training batches are

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = model_inputs(batch, self.device)
        targets, keep = next_token_targets(batch["labels"].to(self.device))
        onpolicy = bool(batch.get("onpolicy"))
        if self._use_fused(inputs):
            terms = self._fused(inputs, targets, keep, onpolicy)
        else:
            terms = self._plain(inputs, targets, keep, onpolicy)
        if "loss" in terms:  # already combined (the fused KD + CE pass)
            return terms
        if "kd" not in terms:
            terms["loss"] = terms["ce"]
        elif onpolicy:
            terms["loss"] = terms["kd"]
        else:
            terms["loss"] = self.spec.alpha * terms["kd"] + (1 - self.spec.alpha) * terms["ce"]
        return terms

    def _fused(self, inputs, targets, keep, onpolicy) -> dict[str, torch.Tensor]:
        weight = self.student.get_output_embeddings().weight
        hidden = final_hidden(self.student, inputs)[:, :-1].to(weight.dtype)
        if self.teacher is not None and not onpolicy:  # both terms from one pass over the heads
            t_weight = self.teacher.model.get_output_embeddings().weight
            with torch.no_grad():
                t_hidden = final_hidden(self.teacher.model, inputs)[:, :-1].to(t_weight.dtype)
            T, alpha = self.spec.temperature, self.spec.alpha
            t2 = T * T if self.spec.scale_by_t2 else 1.0
            loss, kd, ce = fused_linear_kd_and_ce(
                hidden, weight, t_hidden, t_weight, targets, kd_weight=alpha * t2, ce_weight=1 - alpha,
                divergence=self.spec.divergence, temperature=T, chunk_size=self.spec.chunk_size,
                vocab_size=self.vocab_size, **divergence_params(self.spec),
            )
            return {"ce": ce, "kd": kd * t2, "loss": loss}
        terms: dict[str, torch.Tensor] = {}
        if not onpolicy:
            terms["ce"] = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=self.spec.chunk_size)
        if self.teacher is not None:
            t_weight = self.teacher.model.get_output_embeddings().weight
            with torch.no_grad():
                t_hidden = final_hidden(self.teacher.model, inputs)[:, :-1].to(t_weight.dtype)
            T = self.spec.temperature
            kd = fused_linear_divergence(
                hidden, weight, t_hidden, t_weight, divergence=self.spec.divergence, temperature=T, mask=keep,
                chunk_size=self.spec.chunk_size, vocab_size=self.vocab_size, **divergence_params(self.spec),
            )
            terms["kd"] = kd * (T * T) if self.spec.scale_by_t2 else kd
        return terms

    def _plain(self, inputs, targets, keep, onpolicy) -> dict[str, torch.Tensor]:
        logits = self.student(**inputs, use_cache=False).logits[:, :-1]
        terms: dict[str, torch.Tensor] = {}
        if not onpolicy:
            # A mean over the counted positions that is 0 (zero gradient) when there are none, as on the fused path:
            # F.cross_entropy's mean is NaN then, and a NaN micro-batch poisons the whole accumulated step.
            summed = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                     reduction="sum")
            terms["ce"] = summed / keep.sum().clamp_min(1)
        if self.teacher is not None:
            t_logits = self.teacher(**inputs, use_cache=False).logits[:, :-1]
            V = self.vocab_size
            terms["kd"] = soft_term(logits[..., :V], t_logits[..., :V], None, self.spec, mask=keep)
        return terms
