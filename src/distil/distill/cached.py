"""Token-level distillation of causal LMs from an offline teacher cache: the teacher's soft targets are read by
sample id instead of running the teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distil.cache import TeacherCache
from distil.data.formats import IGNORE
from distil.distill.lm import next_token_targets
from distil.distill.objectives import LogitLoss, divergence_params
from distil.losses import cached_divergence
from distil.train.objective import Objective


class CachedLMObjective(Objective):
    """Like CausalLMObjective, with the teacher's soft targets read from a cache by sample id (batch['id'])."""

    unit = "tokens"

    def __init__(self, student: nn.Module, cache: TeacherCache, spec: LogitLoss, *, device: torch.device):
        self.student, self.cache, self.spec, self.device = student, cache, spec, device
        self.modules = {"student": student}

    def weight(self, batch: dict[str, Any]) -> int:
        return int(next_token_targets(batch["labels"])[1].sum())

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(self.device)
        logits = self.student(input_ids=ids, attention_mask=batch["attention_mask"].to(self.device),
                              use_cache=False).logits
        targets, keep = next_token_targets(batch["labels"].to(self.device))
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        cached = self.cache.targets(batch["id"], ids.shape[1])
        vocab = self.cache.vocab_size
        # Position t of the cache holds the teacher's distribution of token t+1, as logits position t does.
        kd = cached_divergence(logits[:, :-1, :vocab], {k: (v[:, :-1] if v.dim() > 0 else v) for k, v in cached.items()},
                               divergence=self.spec.divergence, temperature=self.spec.temperature, mask=keep,
                               **divergence_params(self.spec))
        T = self.spec.temperature
        kd = kd * (T * T) if self.spec.scale_by_t2 else kd
        return {"loss": self.spec.alpha * kd + (1 - self.spec.alpha) * ce, "ce": ce, "kd": kd}
