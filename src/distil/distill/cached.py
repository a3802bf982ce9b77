"""Token-level distillation of causal LMs from an offline teacher cache: the teacher's soft targets are read by
sample id instead of running the teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distil.cache import TeacherCache
from distil.data.formats import IGNORE
from distil.distill.lm import final_hidden, fused_or_note, fused_problem, next_token_targets
from distil.distill.objectives import LogitLoss, divergence_params
from distil.losses import cached_divergence
from distil.losses.fused_sparse import FUSED_CACHE_MODES, cache_mode, fused_linear_cached_kd_and_ce
from distil.train.objective import Objective


class CachedLMObjective(Objective):
    """Like CausalLMObjective, with the teacher's soft targets read from a cache by sample id (batch['id'])."""

    unit = "tokens"

    def __init__(self, student: nn.Module, cache: TeacherCache, spec: LogitLoss, *, device: torch.device):
        self.student, self.cache, self.spec, self.device = student, cache, spec, device
        self.modules = {"student": student}
        self.fused: bool | None = None if spec.fused else False  # None: decided on the first batch

    def weight(self, batch: dict[str, Any]) -> int:
        return int(next_token_targets(batch["labels"])[1].sum())

    def _use_fused(self, inputs: dict[str, torch.Tensor], cached: dict[str, torch.Tensor]) -> bool:
        """Once, on the first batch: the fused path for top-k and sampled caches and a plain linear student head."""
        if self.fused is None:
            problem = fused_problem(self.student, "student", inputs)
            if cache_mode(cached) not in FUSED_CACHE_MODES:
                problem = "the cache holds full distributions"
            self.fused = fused_or_note(problem, "the cached losses")
        return self.fused

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(self.device)
        inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"].to(self.device)}
        targets, keep = next_token_targets(batch["labels"].to(self.device))
        # Position t of the cache holds the teacher's distribution of token t+1, as logits position t does.
        cached = {k: (v[:, :-1] if v.dim() > 0 else v) for k, v in self.cache.targets(batch["id"], ids.shape[1]).items()}
        T, alpha, vocab = self.spec.temperature, self.spec.alpha, self.cache.vocab_size
        t2 = T * T if self.spec.scale_by_t2 else 1.0
        if self._use_fused(inputs, cached):  # KD and CE from one chunked pass over the head: no full logits
            weight = self.student.get_output_embeddings().weight
            hidden = final_hidden(self.student, inputs)[:, :-1].to(weight.dtype)
            loss, kd, ce = fused_linear_cached_kd_and_ce(
                hidden, weight, cached, targets, kd_weight=alpha * t2, ce_weight=1 - alpha,
                divergence=self.spec.divergence, temperature=T, vocab_size=vocab, chunk_size=self.spec.chunk_size,
                **divergence_params(self.spec))
            return {"loss": loss, "ce": ce, "kd": kd * t2}
        logits = self.student(**inputs, use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        kd = cached_divergence(logits[:, :-1, :vocab], cached, divergence=self.spec.divergence, temperature=T,
                               mask=keep, **divergence_params(self.spec)) * t2
        return {"loss": alpha * kd + (1 - alpha) * ce, "ce": ce, "kd": kd}
