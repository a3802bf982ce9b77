"""Measuring a causal LM for the summary: held-out perplexity and agreement, size, generation speed, peak memory, and
the recipe's benchmark (HumanEval pass@1) where it has one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distil.config.adapt import benchmark
from distil.config.schema import DatasetData, Recipe
from distil.data.sources.dataset import dataset_rows
from distil.data.packing import model_inputs
from distil.errors import DistilError
from distil.measure.benchmark import humaneval_pass_at_1, humaneval_problems
from distil.measure.cost import folder_size, measure_peak_memory, parameter_count
from distil.measure.lm import agreement, generation_speed, lm_scores


BENCHMARK_DATA = ("benchmark scores held-out rows of your own data: use data.kind dataset (data.path: humaneval for "
                  "HumanEval)")
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


def benchmark_problems(recipe: Recipe) -> list[dict[str, Any]] | None:
    """The held-out rows the recipe's benchmark scores (the same split as training's), or None without one."""
    if recipe.benchmark is None:
        return None
    data = recipe.data
    if not isinstance(data, DatasetData):
        raise DistilError(BENCHMARK_DATA)
    _, held = dataset_rows(data, recipe.seed)
    return humaneval_problems(held, recipe.benchmark.problems)


def benchmark_score(recipe: Recipe, model: Any, tokenizer: Any, problems: list[dict[str, Any]] | None, who: str,
                    run_dir: Path, show_progress: bool) -> dict[str, float]:
    """{"pass_at_1": ...} for one model (completions and outcomes in RUN_DIR/benchmark/<who>.jsonl), {} without a
    benchmark."""
    if problems is None or recipe.benchmark is None:
        return {}
    folder = run_dir / "benchmark"
    folder.mkdir(parents=True, exist_ok=True)
    rate = humaneval_pass_at_1(model, tokenizer, problems, folder / f"{who}.jsonl", benchmark(recipe.benchmark),
                               model_id=who, show_progress=show_progress)
    return {"pass_at_1": rate}


def benchmark_key(recipe: Recipe, problems: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What a remembered teacher measurement with a benchmark depends on: its settings and problems."""
    if problems is None or recipe.benchmark is None:
        return {}
    return {"benchmark": recipe.benchmark.model_dump(mode="json"),
            "problems": [(p.get("task_id"), p["prompt"], p["test"]) for p in problems]}
