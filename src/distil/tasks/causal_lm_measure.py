"""Measuring a causal LM for the summary: held-out perplexity and agreement, size, generation speed, peak memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distil.data.packing import model_inputs
from distil.measure.cost import folder_size, measure_peak_memory, parameter_count
from distil.measure.lm import agreement, generation_speed, lm_scores


SPEED_KEYS = ("tokens_per_s_b1", "tokens_per_s_b8", "latency_ms", "peak_memory_bytes", "peak_memory_batch")


def architecture(model: Any) -> tuple:
    """Models with equal architectures (classes, parameter names, shapes, dtypes) run at the same speed."""
    return type(model).__name__, tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())


def measure_lm(model: Any, folder: Path, eval_batches: list[dict[str, Any]], vocab: int,
               teacher_predictions: torch.Tensor | None, tokenizer: Any, repeats: int = 2,
               speed: dict[str, Any] | None = None, token_lengths: torch.Tensor | None = None
               ) -> tuple[dict[str, Any], torch.Tensor]:
    """A model's summary row (held-out perplexity and agreement, size, generation speed, peak memory; bits per byte
    with `token_lengths`, from the same pass) and its top-1 predictions at the scored positions; `speed`: the speed
    and memory already measured on a model of the same architecture."""
    model.eval()
    ppl, predictions, bpb = lm_scores(model, eval_batches, vocab_size=vocab, token_lengths=token_lengths)
    if speed is None:
        speed_1 = generation_speed(model, batch_size=1, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                   repeats=repeats)
        speed_8 = generation_speed(model, batch_size=8, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                   repeats=repeats)
        device = next(model.parameters()).device
        inputs = _memory_batch(eval_batches, device)
        with torch.inference_mode():
            peak = measure_peak_memory(model, lambda: model(**inputs, use_cache=False), device)
        speed = {"tokens_per_s_b1": speed_1, "tokens_per_s_b8": speed_8, "latency_ms": 1000.0 / speed_1,
                 "peak_memory_bytes": peak, "peak_memory_batch": len(inputs["input_ids"])}
    info_file = folder / "train.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        **({"bits_per_byte": bpb} if bpb is not None else {}),
        "perplexity": ppl,
        "agreement": 1.0 if teacher_predictions is None else agreement(predictions, teacher_predictions),
        "params": parameter_count(model),
        "size_bytes": weights or folder_size(folder),
        **{key: speed[key] for key in SPEED_KEYS},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "train_time_s": info.get("train_time_s"),
        "path": str(folder),
    }, predictions


def _memory_batch(batches: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Up to 8 held-out rows for the peak-memory measurement: the first two batches when they are as wide."""
    first = batches[0]
    if len(batches) > 1 and batches[1]["input_ids"].shape[1] == first["input_ids"].shape[1]:
        first = {k: torch.cat([first[k], batches[1][k]]) for k in ("input_ids", "attention_mask")}
    return model_inputs(first, device)
