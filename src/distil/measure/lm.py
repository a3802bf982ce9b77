"""Evaluating language models: held-out perplexity, top-1 agreement with the teacher, generation speed, samples."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distil.data.formats import IGNORE
from distil.data.packing import model_inputs


def perplexity_and_predictions(
    model: nn.Module, batches: Sequence[dict[str, Any]], *, vocab_size: int, device: torch.device | None = None
) -> tuple[float, torch.Tensor]:
    """exp(mean next-token CE) over the positions whose label counts (not -100) in held-out `batches` (input_ids,
    labels and their attention_mask or position_ids), and the model's top-1 prediction at each of them, in order."""
    ppl, predictions, _ = lm_scores(model, batches, vocab_size=vocab_size, device=device)
    return ppl, predictions


def bits_per_byte(model: nn.Module, batches: Sequence[dict[str, Any]], *, token_lengths: torch.Tensor,
                  device: torch.device | None = None) -> float:
    """Bits per UTF-8 byte of held-out text: the summed next-token NLL in bits over the text's bytes, at the positions
    whose label counts. `token_lengths[id]` is the bytes token `id` spells (distil.data.alignment.token_bytes); a
    target that spells none (a special token) counts in neither sum. Unlike perplexity, it does not depend on the
    tokenizer, so models with different vocabularies compare on it."""
    bpb = lm_scores(model, batches, vocab_size=None, token_lengths=token_lengths, device=device)[2]
    assert bpb is not None
    return bpb


@torch.inference_mode()
def lm_scores(model: nn.Module, batches: Sequence[dict[str, Any]], *, vocab_size: int | None,
              token_lengths: torch.Tensor | None = None, device: torch.device | None = None
              ) -> tuple[float, torch.Tensor, float | None]:
    """(perplexity, top-1 predictions, bits per byte or None without `token_lengths`) from one pass over `batches`
    (see perplexity_and_predictions and bits_per_byte); logits beyond `vocab_size` are left out when it is given."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens, predictions, total_bits, total_bytes = 0.0, 0, [], 0.0, 0
    for batch in batches:
        logits = model(**model_inputs(batch, device), use_cache=False).logits[:, :-1, :vocab_size].float()
        targets = batch["labels"][:, 1:].to(device)
        keep = targets != IGNORE
        nll = F.cross_entropy(logits[keep], targets[keep], reduction="none")
        total_nll += float(nll.sum())
        total_tokens += int(keep.sum())
        predictions.append(logits[keep].argmax(-1).cpu())
        if token_lengths is not None:
            # the model's padding rows past the tokenizer's last id spell nothing
            lengths = F.pad(token_lengths.to(device), (0, max(logits.shape[-1] - len(token_lengths), 0)))
            spelled = lengths[targets[keep]]
            total_bits += float(nll[spelled > 0].sum()) / math.log(2)
            total_bytes += int(spelled.sum())
    model.train(was_training)
    bpb = total_bits / max(total_bytes, 1) if token_lengths is not None else None
    return math.exp(total_nll / max(total_tokens, 1)), torch.cat(predictions), bpb


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
