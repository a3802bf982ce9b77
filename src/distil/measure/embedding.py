"""Evaluating sentence encoders: word-to-definition retrieval, and how well the student's pairwise similarities rank
like the teacher's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distil.distill.embedding import encode


@torch.inference_mode()
def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], device: torch.device, *,
                max_length: int, batch_size: int = 128) -> torch.Tensor:
    """Normalised embeddings [N, H] (float32, on the CPU) of `texts`, in order."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(encode(model, enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
    model.train(was_training)
    return torch.cat(out)


def retrieval_top1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """Share of queries whose most similar document is their own (row i <-> row i)."""
    best = (queries @ documents.t()).argmax(dim=1)
    return float((best == torch.arange(len(queries))).float().mean())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    return ranks


def similarity_spearman(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman correlation between the two models' cosine similarities over all pairs of texts (i < j).
    (Ties, which continuous similarities practically never have, get arbitrary distinct ranks.)"""
    n = len(student)
    rows, cols = torch.triu_indices(n, n, offset=1)
    a = _ranks((student @ student.t())[rows, cols])
    b = _ranks((teacher @ teacher.t())[rows, cols])
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))
