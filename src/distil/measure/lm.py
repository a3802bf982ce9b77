"""Evaluating language models: held-out perplexity, top-1 agreement with the teacher, generation speed, samples."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def perplexity_and_predictions(
    model: nn.Module, blocks: torch.Tensor, *, vocab_size: int, batch_size: int = 4, device: torch.device | None = None
) -> tuple[float, torch.Tensor]:
    """exp(mean next-token CE) over all positions of packed `blocks` [N, L], and the top-1 predictions [N, L-1]."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens, predictions = 0.0, 0, []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :vocab_size].float()
        targets = ids[:, 1:]
        total_nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        total_tokens += targets.numel()
        predictions.append(logits.argmax(-1).cpu())
    model.train(was_training)
    return math.exp(total_nll / total_tokens), torch.cat(predictions)


def agreement(predictions: torch.Tensor, teacher_predictions: torch.Tensor) -> float:
    """Fraction of positions where the model's top-1 next token equals the teacher's."""
    return float((predictions == teacher_predictions).float().mean())


@torch.inference_mode()
def generation_speed(
    model: nn.Module, *, batch_size: int, prompt_tokens: int = 16, new_tokens: int = 32, vocab_size: int,
    pad_token_id: int | None = None, repeats: int = 2,
) -> float:
    """Generated tokens per second (greedy, KV cache) at `batch_size`, best of `repeats` after one warm-up."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=pad_token_id, use_cache=True)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        best = min(best, time.perf_counter() - start)
    return batch_size * new_tokens / best


@torch.inference_mode()
def greedy_continuations(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations of raw-text prompts (one at a time: no padding effects), decoded without the prompt."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True)
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs
