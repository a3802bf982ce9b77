"""Token-level distillation between causal LMs that do not share a tokenizer.

Each model reads the same texts with its own tokenizer (`pair_batch`); the soft term compares their next-token
distributions at the positions aligned by character offsets (distil.data.alignment) with ULD or the vocabulary-mapped
KL (distil.losses.cross_vocab), chunked over aligned positions so that neither model's [tokens, vocab] logits exist.
The hard term is the student's own next-token CE. Both are sums over the batch divided by its student target
tokens, so micro-batches accumulate exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distil.data.alignment import Alignment, align_text, token_bytes, tokenize_with_offsets
from distil.data.formats import IGNORE
from distil.distill.lm import (OnPolicy, eos_ids, example_prompt, final_hidden, next_token_targets,
                               sample_continuations)
from distil.distill.pair import Teacher
from distil.losses import fused_linear_cross_entropy
from distil.losses.cross_vocab import Merges, VocabMap, chunked_cross_vocab, mapped_kl_per_position, uld_per_position
from distil.measure.cost import folder_size, measure_latency, parameter_count
from distil.measure.lm import bits_per_byte, perplexity_and_predictions
from distil.train.objective import Objective, teacher_models


@dataclass(frozen=True)
class CrossTokenizerLoss:
    method: Literal["uld", "mapped_kl"] = "mapped_kl"
    alpha: float = 0.5  # weight of the soft term; (1 - alpha) weights the student's next-token CE
    temperature: float = 1.0
    kl_weight: float = 1.0  # mapped_kl: the equal-string tokens' KL
    uld_weight: float = 1.0  # mapped_kl: ULD on what is left unmapped
    top_k: int | None = 1024  # ULD ranks each row's top_k probabilities, not all (losses.cross_vocab.sorted_distance)
    chunk_size: int = 256  # aligned positions per chunk


def pair_batch(texts: list[str], student_tokenizer: Any, teacher_tokenizer: Any, *, max_length: int,
               student_pad: int, teacher_pad: int, trained_from: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Both tokenizations of `texts`, right-padded, and their aligned positions as flat indices into [B * L]:
    student_index / teacher_index, and for multi-token spellings teacher_span_end (-1 where none) with
    merge_token, the student token the teacher tokens after teacher_index up to teacher_span_end spell.

    With `trained_from` (a character per text, e.g. where a completion starts after its prompt), the tokens that
    start before it are context: not labels (student `labels`, teacher `teacher_labels`), and no aligned position
    predicts them."""
    rows = [(s, t, alignment, s, t)  # + both models' labels: every token by default
            for s, t, alignment in (align_text(text, student_tokenizer, teacher_tokenizer, max_length=max_length)
                                    for text in texts)]
    if trained_from is not None:
        rows = [_context_dropped(row, text, start, student_tokenizer, teacher_tokenizer, max_length)
                for row, text, start in zip(rows, texts, trained_from)]
    width_s = max(len(row[0]) for row in rows)
    width_t = max(len(row[1]) for row in rows)
    ids = torch.full((len(rows), width_s), student_pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    t_ids = torch.full((len(rows), width_t), teacher_pad, dtype=torch.long)
    s_mask, t_mask = torch.zeros_like(ids), torch.zeros_like(t_ids)
    s_index, t_index, span_end, merge_token = [], [], [], []
    t_labels = torch.full_like(t_ids, IGNORE)
    for b, (s, t, alignment, s_trained, t_trained) in enumerate(rows):
        ids[b, : len(s)], labels[b, : len(s)], s_mask[b, : len(s)] = torch.tensor(s), torch.tensor(s_trained), 1
        t_ids[b, : len(t)], t_labels[b, : len(t)], t_mask[b, : len(t)] = torch.tensor(t), torch.tensor(t_trained), 1
        nxt = alignment.teacher_next
        spelled = nxt > alignment.teacher + 1  # one teacher token: its mapping (if its string is equal) covers it
        s_index.append(b * width_s + alignment.student)
        t_index.append(b * width_t + alignment.teacher)
        span_end.append(torch.where(spelled, b * width_t + nxt, -1))
        merge_token.append(torch.where(spelled, ids[b, (alignment.student + 1).clamp_max(width_s - 1)], -1))
    return {"input_ids": ids, "attention_mask": s_mask, "labels": labels, "teacher_input_ids": t_ids,
            "teacher_attention_mask": t_mask, "teacher_labels": t_labels, "student_index": torch.cat(s_index), "teacher_index": torch.cat(t_index),
            "teacher_span_end": torch.cat(span_end), "merge_token": torch.cat(merge_token)}


def _context_dropped(row: tuple, text: str, start: int, student_tokenizer: Any, teacher_tokenizer: Any,
                     max_length: int) -> tuple:
    """A pair row with the tokens that start before character `start` made context."""
    s_ids, t_ids, alignment, _, _ = row

    def labels(tokenizer: Any, ids: list[int]) -> list[int]:
        _, offsets = tokenize_with_offsets(tokenizer, text, max_length=max_length)
        return [IGNORE if begin < start else token for token, (begin, _) in zip(ids, offsets)]

    s_labels = labels(student_tokenizer, s_ids)
    target = torch.tensor(s_labels)[alignment.student + 1] if len(alignment) else torch.zeros(0, dtype=torch.long)
    keep = target != IGNORE
    kept = Alignment(alignment.student[keep], alignment.teacher[keep], alignment.teacher_next[keep])
    return s_ids, t_ids, kept, s_labels, labels(teacher_tokenizer, t_ids)


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
    with torch.no_grad():
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
    """alpha * T^2 * (ULD or mapped KL at aligned positions) + (1 - alpha) * the student's next-token CE.

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
        targets, _ = next_token_targets(batch["labels"])
        terms = {"ce": fused_linear_cross_entropy(hidden[:, :-1], s_weight, targets, reduction="sum") / tokens}
        teacher = self.teacher.model
        t_weight = teacher.get_output_embeddings().weight
        with torch.no_grad():
            t_hidden = final_hidden(teacher, {"input_ids": batch["teacher_input_ids"],
                                              "attention_mask": batch["teacher_attention_mask"]}).to(t_weight.dtype)
        s_flat, t_flat = hidden.flatten(0, 1), t_hidden.flatten(0, 1)
        s_index, t_index = batch["student_index"], batch["teacher_index"]
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
        if "onpolicy" in batch:  # the student's own samples: the soft term alone, as in GKD
            terms["loss"] = spec.temperature ** 2 * terms["kd"]
        else:
            terms["loss"] = spec.alpha * spec.temperature ** 2 * terms["kd"] + (1 - spec.alpha) * terms["ce"]
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
        ppl, _ = perplexity_and_predictions(model, own, vocab_size=model.config.vocab_size, device=device)
        example = {k: v[:1].to(device) for k, v in own[0].items() if k != "labels"}
        with torch.inference_mode():
            latency = measure_latency(lambda: model(**example), runs=5, warmup=1)  # noqa: B023
        rows[name] = {"bits_per_byte": bits_per_byte(model, own, token_lengths=lengths, device=device),
                      "perplexity": ppl, "params": parameter_count(model), "latency_ms": latency}
    info = json.loads((folder / "train.json").read_text())
    rows["distilled"].update(size_bytes=folder_size(folder), train_time_s=info.get("train_time_s"), path=str(folder))
    return rows
