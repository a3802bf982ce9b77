"""Token-level distillation between causal LMs that do not share a tokenizer.

Each model reads the same texts with its own tokenizer (distil.data.pairs); the soft term compares their next-token
distributions at the positions aligned by character offsets (distil.data.alignment) with ULD or the vocabulary-mapped
KL (distil.losses.cross_vocab), chunked over aligned positions so that neither model's [tokens, vocab] logits exist.
The hard term is the student's own next-token CE. Both are sums over the batch divided by its student target
tokens, so micro-batches accumulate exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distil.data.alignment import token_bytes
from distil.data.pairs import pair_batch
from distil.distill.lm import (OnPolicy, eos_ids, example_prompt, final_hidden, next_token_targets,
                               sample_continuations)
from distil.distill.pair import Teacher
from distil.losses import fused_linear_cross_entropy
from distil.losses.cross_vocab import Merges, VocabMap, chunked_cross_vocab, mapped_kl_per_position, uld_per_position
from distil.measure.cost import folder_size, measure_latency, parameter_count
from distil.measure.lm import lm_scores
from distil.train.objective import Objective, teacher_models


@dataclass(frozen=True)
class CrossTokenizerLoss:
    method: Literal["uld", "mapped_kl"] = "mapped_kl"
    alpha: float = 0.5  # weight of the soft term; (1 - alpha) weights the student's CE where a teacher target is
    temperature: float = 1.0
    kl_weight: float = 1.0  # mapped_kl: the equal-string tokens' KL
    uld_weight: float = 1.0  # mapped_kl: ULD on what is left unmapped
    top_k: int | None = 1024  # ULD ranks each row's top_k probabilities, not all (losses.cross_vocab.sorted_distance)
    chunk_size: int = 256  # aligned positions per chunk


def spelling_logprobs(hidden: torch.Tensor, weight: torch.Tensor, next_ids: torch.Tensor, starts: torch.Tensor,
                      ends: torch.Tensor, temperature: float) -> torch.Tensor:
    """[M] the teacher's log-probability of the tokens after each start up to its end (flat positions start..end-1
    each predicting the next id), temperature-softened; only the positions some span covers are computed."""
    lengths = (ends - starts).clamp_min(0)
    if int(lengths.sum()) == 0:
        return torch.zeros(len(starts), dtype=torch.float32, device=hidden.device)
    span = torch.repeat_interleave(torch.arange(len(starts), device=hidden.device), lengths)
    offset = torch.arange(int(lengths.sum()), device=hidden.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)
    positions = starts[span] + offset
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):  # fp32 even under bf16 autocast
        logits = hidden[positions].float() @ weight.float().T
        token = F.log_softmax(logits / temperature, dim=-1).gather(1, next_ids[positions + 1, None]).squeeze(1)
    return torch.zeros(len(starts), dtype=torch.float32, device=hidden.device).index_add_(0, span, token)


@dataclass(frozen=True)
class Tokenizers:
    """What on-policy steps need to turn the student's samples into pair batches again."""

    student: Any
    teacher: Any
    max_length: int


class CrossTokenizerObjective(Objective):
    """alpha * T^2 * (ULD or mapped KL at aligned positions) + (1 - alpha) * the student's next-token CE there, and
    the CE at full weight at the trained positions no teacher position is aligned with (nothing to mix it with:
    halving it there only slowed the student down, by 0.001-0.002 bits per byte in qwen-coder-smollm2-distil).

    With `onpolicy` (and `tokenizers`), a step is on-policy with probability lmbda, as in GKD (distil.distill.lm):
    the student continues each example's prompt, the text it wrote is read by both tokenizers again, and only the
    soft term (T^2 * divergence) at the aligned positions of the sampled part is trained on."""

    unit = "tokens"

    def __init__(self, student: nn.Module, teacher: Teacher, spec: CrossTokenizerLoss, *, vocab: VocabMap | None,
                 device: torch.device, onpolicy: OnPolicy | None = None, tokenizers: Tokenizers | None = None):
        if spec.method == "mapped_kl" and vocab is None:
            raise ValueError("method mapped_kl needs the vocabulary map (distil.data.alignment.vocab_map)")
        if onpolicy is not None and tokenizers is None:
            raise ValueError("on-policy steps need both tokenizers (tokenizers=Tokenizers(...))")
        self.student, self.teacher, self.spec, self.device = student, teacher, spec, device
        self.vocab = vocab.to(device) if vocab is not None else None
        self.onpolicy, self.tokenizers = onpolicy, tokenizers
        self.modules = {"student": student}

    def prepare(self, batches: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """With probability lmbda (decided once per optimizer step), every micro-batch becomes student samples."""
        spec = self.onpolicy
        if spec is None or step < spec.start_step or not bool(torch.rand(()) < spec.lmbda):
            return batches
        return [self._sample(batch) for batch in batches]

    def _sample(self, batch: dict[str, Any]) -> dict[str, Any]:
        spec, tokenizers = self.onpolicy, self.tokenizers
        assert spec is not None and tokenizers is not None
        s_tok = tokenizers.student
        ids, labels, lengths = batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].sum(1)
        prompts = [example_prompt(row, row_labels, spec.prompt_tokens, int(n))
                   for row, row_labels, n in zip(ids, labels, lengths.tolist())]
        pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else eos_ids(self.student)[0]
        texts, starts = [], []
        for prompt, sampled in zip(prompts, sample_continuations(self.student, prompts, spec, pad, self.device)):
            prompt_text = s_tok.decode(prompt, skip_special_tokens=True)
            text = s_tok.decode(prompt + sampled, skip_special_tokens=True)
            texts.append(text)
            # the sampled text starts where the prompt's does end (a prompt cut inside a character decodes otherwise)
            starts.append(len(prompt_text) if text.startswith(prompt_text) else len(os.path.commonprefix([text,
                                                                                                      prompt_text])))
        teacher_pad = tokenizers.teacher.pad_token_id
        return {**pair_batch(texts, s_tok, tokenizers.teacher, max_length=tokenizers.max_length, student_pad=pad,
                             teacher_pad=teacher_pad if teacher_pad is not None else 0, trained_from=starts),
                "onpolicy": torch.ones(())}

    def teachers(self) -> dict[str, nn.Module]:
        return teacher_models(teacher=self.teacher)

    def weight(self, batch: dict[str, Any]) -> int:
        return int(next_token_targets(batch["labels"])[1].sum())

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        spec, device = self.spec, self.device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = max(self.weight(batch), 1)
        s_weight = self.student.get_output_embeddings().weight
        hidden = final_hidden(self.student, {"input_ids": batch["input_ids"],
                                             "attention_mask": batch["attention_mask"]}).to(s_weight.dtype)
        targets, counted = next_token_targets(batch["labels"])
        s_index, t_index = batch["student_index"], batch["teacher_index"]
        has_teacher = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=device).flatten()
        has_teacher[s_index] = True
        has_teacher = has_teacher.view(hidden.shape[:2])[:, :-1] & counted
        onpolicy = "onpolicy" in batch
        with torch.no_grad() if onpolicy else contextlib.nullcontext():  # on the student's samples: reported only
            ce = {part: fused_linear_cross_entropy(hidden[:, :-1][where], s_weight, targets[where], reduction="sum")
                  / tokens for part, where in (("aligned", has_teacher), ("unaligned", counted & ~has_teacher))}
        terms = {"ce": ce["aligned"] + ce["unaligned"]}
        teacher = self.teacher.model
        t_weight = teacher.get_output_embeddings().weight
        with torch.no_grad():
            t_hidden = final_hidden(teacher, {"input_ids": batch["teacher_input_ids"],
                                              "attention_mask": batch["teacher_attention_mask"]}).to(t_weight.dtype)
        s_flat, t_flat = hidden.flatten(0, 1), t_hidden.flatten(0, 1)
        merges = None
        if spec.method == "uld":
            per_position, options = uld_per_position, {"top_k": spec.top_k}
        else:
            spans = batch["teacher_span_end"]
            logprob = spelling_logprobs(t_flat, t_weight, batch["teacher_input_ids"].flatten(), t_index,
                                        torch.where(spans >= 0, spans, t_index), spec.temperature)
            first = batch["teacher_input_ids"].flatten()[(t_index + 1).clamp_max(t_flat.shape[0] - 1)]
            merges = Merges(batch["merge_token"], first, logprob)
            per_position = mapped_kl_per_position
            options = {"vocab": self.vocab, "kl_weight": spec.kl_weight, "uld_weight": spec.uld_weight,
                       "top_k": spec.top_k}
        aligned = len(s_index)
        kd = chunked_cross_vocab(per_position, s_flat[s_index], s_weight, t_flat[t_index], t_weight, merges=merges,
                                 chunk_size=spec.chunk_size, temperature=spec.temperature, **options)
        terms["kd"] = kd * aligned / tokens  # a sum over aligned positions per student target token
        if onpolicy:  # the student's own samples: the soft term alone, as in GKD
            terms["loss"] = spec.temperature ** 2 * terms["kd"]
        else:
            terms["loss"] = (spec.alpha * spec.temperature ** 2 * terms["kd"] + (1 - spec.alpha) * ce["aligned"]
                             + ce["unaligned"])
        return terms


def model_view(batch: dict[str, torch.Tensor], who: str) -> dict[str, torch.Tensor]:
    """One model's own tokens of a pair batch, as a plain LM batch (labels -100 on padding)."""
    if who == "student":
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"],
            "labels": batch["teacher_labels"]}


def cross_tokenizer_rows(teacher: nn.Module, student: nn.Module, batches: list[dict[str, torch.Tensor]],
                         teacher_tokenizer: Any, student_tokenizer: Any, folder: Path, device: torch.device
                         ) -> dict[str, dict[str, Any]]:
    """Summary rows of a cross-tokenizer pair on held-out pair batches: bits per byte (comparable across the two
    tokenizers), each model's perplexity on its own tokens (not comparable), parameters and latency."""
    rows = {}
    for name, model, tokenizer, who in (("teacher", teacher, teacher_tokenizer, "teacher"),
                                        ("distilled", student, student_tokenizer, "student")):
        own = [model_view(b, who) for b in batches]
        lengths = torch.tensor([len(b) if b is not None else 0 for b in token_bytes(tokenizer)])
        ppl, _, bpb = lm_scores(model, own, vocab_size=model.config.vocab_size, token_lengths=lengths, device=device)
        example = {k: v[:1].to(device) for k, v in own[0].items() if k != "labels"}
        with torch.inference_mode():
            latency = measure_latency(lambda: model(**example), runs=5, warmup=1)  # noqa: B023
        rows[name] = {"bits_per_byte": bpb, "perplexity": ppl, "params": parameter_count(model),
                      "latency_ms": latency}
    info = json.loads((folder / "train.json").read_text())
    rows["distilled"].update(size_bytes=folder_size(folder), train_time_s=info.get("train_time_s"), path=str(folder))
    return rows
