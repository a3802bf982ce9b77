"""Sentence-embedding distillation: mean pooling + L2 norm (as sentence-transformers' all-MiniLM-L6-v2 does), the
objectives of the embedding arms, and the evaluation (word-to-definition retrieval, similarity rank correlation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distil.distill.objectives import LogitLoss
from distil.distill.pair import Teacher
from distil.losses.features import hidden_cosine, hidden_mse
from distil.train.objective import Objective, teacher_models

CONTRASTIVE_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default (cosine similarity x 20)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states [B, S, H] over the real tokens of `mask` [B, S], L2-normalised -> [B, H]."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled.float(), p=2, dim=-1)


def encode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return mean_pool(out.last_hidden_state, attention_mask)


def contrastive_loss(queries: torch.Tensor, documents: torch.Tensor, scale: float = CONTRASTIVE_SCALE) -> torch.Tensor:
    """Symmetric in-batch InfoNCE over normalised embeddings: query i's positive is document i, the rest negatives."""
    logits = scale * queries @ documents.t()
    target = torch.arange(len(queries), device=queries.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class EmbeddingObjective(Objective):
    """Without a teacher (the student alone): in-batch contrastive learning on the batch's (word, definition) pairs
    -- the first `pairs` rows are words, the next `pairs` their definitions. With one: alpha * the sentence-embedding
    term (`loss.embedding`: 1 - cosine, or MSE, between the pooled, normalised embeddings) + (1 - alpha) * that
    contrastive term where the batch has pairs (the teacher's signal beside the task's own, as soft targets sit
    beside hard labels); alpha = 1 is the embedding term alone."""

    unit = "samples"

    def __init__(self, student: nn.Module, teacher: Teacher | None, spec: LogitLoss, device: torch.device) -> None:
        self.student, self.teacher, self.spec, self.device = student, teacher, spec, device
        self.modules = {"student": student}

    def teachers(self) -> dict[str, nn.Module]:
        return teacher_models(teacher=self.teacher)

    def weight(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0])

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        student = encode(self.student, ids, mask)
        if self.teacher is None:
            n = int(batch["pairs"])
            value = contrastive_loss(student[:n], student[n : 2 * n])
            return {"loss": value, "contrastive": value}
        teacher = encode(self.teacher, ids, mask)
        fn = hidden_cosine if self.spec.embedding == "cosine" else hidden_mse
        value = fn(student, teacher)
        n, alpha = int(batch.get("pairs", 0)), self.spec.alpha
        if n == 0 or alpha == 1.0:
            return {"loss": value, "embedding": value}
        contrastive = contrastive_loss(student[:n], student[n : 2 * n])
        return {"loss": alpha * value + (1 - alpha) * contrastive, "embedding": value, "contrastive": contrastive}
