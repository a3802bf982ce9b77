"""ONNX export of a run's student, checked against PyTorch and measured beside the teacher (and int8 copy).

Every variant (teacher and student in PyTorch, the student in onnxruntime, its int8 copy) is measured by the same
functions on the same inputs with the same thread count: size on disk, median latency at batch 1, throughput at a
larger batch, and quality on the recipe's evaluation data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distil.export import graph
from distil.measure.exported import (accuracy, classifier_eval_data, classifier_logits, lm_batches, lm_eval_batches,
                                    lm_scores, max_abs_diff)
from distil.measure.cost import folder_size, measure_latency, measure_throughput

CLASSIFIER_TOLERANCE = 1e-4
# Logits of a deep LM are larger and pass through more float32 rounding than a small classifier's.
LM_TOLERANCE = 1e-3
CLASSIFIER_BATCH = 256


def _check(inputs: str, diff: float, tolerance: float) -> dict[str, Any]:
    return {"inputs": inputs, "max_abs_diff": diff, "tolerance": tolerance, "passed": diff <= tolerance}


# ------------------------------------------------------------------------------------------------- classifiers
def classifier(run_dir: Path, summary: dict[str, Any], arm: str, folder: Path, out: Path, *,
               quantize: str | None, runs: int) -> dict[str, Any]:
    from distil.models.vision import load_classifier

    model = load_classifier(folder)
    x, y, source = classifier_eval_data(run_dir)
    path = out / "model.onnx"
    graph.export_graph(graph.ClassifierGraph(model), {"pixels": x[:2]}, {"pixels": {0: "batch"}}, path)
    onnx_run = graph.runner(graph.session(path))
    with torch.inference_mode():
        diff = max_abs_diff(classifier_logits(onnx_run, x), classifier_logits(model, x))
    batch = x[:CLASSIFIER_BATCH]

    def measure(run: Callable[[torch.Tensor], torch.Tensor], size: int) -> dict[str, Any]:
        return {"accuracy": accuracy(classifier_logits(run, x), y), "size_bytes": size,
                "latency_ms": measure_latency(lambda: run(x[:1]), runs=runs),
                f"samples_per_s_b{len(batch)}": measure_throughput(lambda: run(batch), len(batch), runs=runs)}

    rows: dict[str, dict[str, Any]] = {}
    teacher_path = summary["arms"].get("teacher", {}).get("path")
    if arm != "teacher" and teacher_path and (Path(teacher_path) / "model.safetensors").is_file():
        rows["teacher (PyTorch)"] = measure(load_classifier(teacher_path),
                                            folder_size(Path(teacher_path) / "model.safetensors"))
    rows[f"{arm} (PyTorch)"] = measure(model, folder_size(folder / "model.safetensors"))
    rows[f"{arm} ONNX fp32"] = measure(onnx_run, graph.onnx_size(path))
    files = [path]
    if quantize == "int8":
        q_path = out / "model.int8.onnx"
        graph.quantize_int8(path, q_path)
        int8_run = graph.runner(graph.session(q_path))
        rows[f"{arm} ONNX int8"] = measure(int8_run, graph.onnx_size(q_path))
        files.append(q_path)
    return {"path": str(path), "files": [str(f) for f in files], "size_bytes": graph.onnx_size(path),
            "exporter": "torch.onnx.export(dynamo=True)", "opset": graph.OPSET, "inputs": ["pixels"],
            "dynamic_axes": {"pixels": ["batch"]}, "check": _check(source, diff, CLASSIFIER_TOLERANCE),
            "metric": "accuracy", "measurements": rows, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- language models
def _example(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A traced example with batch and sequence sizes of at least 2 (torch.export specialises sizes 0 and 1)."""
    longest = max(batches, key=lambda b: b["input_ids"].shape[1])  # lm_batches guarantees one of >= 2 tokens
    ids, mask = longest["input_ids"], longest["attention_mask"]
    if ids.shape[0] < 2:
        ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    return {"input_ids": ids[:2], "attention_mask": mask[:2]}


def causal_lm(run_dir: Path, summary: dict[str, Any], arm: str, folder: Path, out: Path, *, quantize: str | None,
              runs: int, texts: list[str] | None) -> dict[str, Any]:
    from distil.models.hf import load_causal_lm

    model, tokenizer = load_causal_lm(folder, dtype="float32")
    if texts is None:
        batches, inputs = lm_eval_batches(run_dir, tokenizer)
    else:
        batches = lm_batches(tokenizer, texts)
        inputs = f"{int(sum(b['attention_mask'].sum() for b in batches))} tokens of {len(texts)} given texts"
    vocab = summary.get("vocab_compared")
    path = out / "model.onnx"
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    graph.export_graph(graph.CausalLMGraph(model), _example(batches), axes, path)
    onnx_run = graph.runner(graph.session(path))

    def torch_run(m: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        return lambda b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits

    with torch.inference_mode():
        diff = max(max_abs_diff(onnx_run(b), torch_run(model)(b), b["attention_mask"]) for b in batches)
    one = {k: v[:1, : int(batches[0]["attention_mask"][0].sum())] for k, v in batches[0].items()}
    big = batches[0]

    teacher_logits = None
    teacher_path = summary["arms"].get("teacher", {}).get("path")
    teacher = None
    if arm != "teacher" and teacher_path and (Path(teacher_path) / "config.json").is_file():
        teacher, _ = load_causal_lm(teacher_path, dtype="float32")
        with torch.inference_mode():
            teacher_logits = [torch_run(teacher)(b) for b in batches]

    def measure(run: Callable[[dict[str, torch.Tensor]], torch.Tensor], size: int) -> dict[str, Any]:
        scores = lm_scores(run, batches, teacher_logits, vocab)
        return {**scores, "size_bytes": size, "latency_ms": measure_latency(lambda: run(one), runs=runs),
                f"tokens_per_s_b{len(big['input_ids'])}": measure_throughput(
                    lambda: run(big), big["input_ids"].numel(), runs=max(3, runs // 3))}

    rows: dict[str, dict[str, Any]] = {}
    if teacher is not None:
        rows["teacher (PyTorch)"] = measure(torch_run(teacher), summary["arms"]["teacher"].get("size_bytes")
                                            or _weights_size(Path(teacher_path)))
        del teacher
    rows[f"{arm} (PyTorch)"] = measure(torch_run(model), _weights_size(folder))
    rows[f"{arm} ONNX fp32"] = measure(onnx_run, graph.onnx_size(path))
    files = [path]
    if quantize == "int8":
        q_path = out / "model.int8.onnx"
        graph.quantize_int8(path, q_path)
        rows[f"{arm} ONNX int8"] = measure(graph.runner(graph.session(q_path)), graph.onnx_size(q_path))
        files.append(q_path)
    tokenizer.save_pretrained(out)  # the graph takes token ids: ship the tokenizer that makes them
    return {"path": str(path), "files": [str(f) for f in files], "size_bytes": graph.onnx_size(path),
            "exporter": "torch.onnx.export(dynamo=True), use_cache=False", "opset": graph.OPSET,
            "inputs": ["input_ids", "attention_mask"], "dynamic_axes": {k: ["batch", "sequence"] for k in axes},
            "check": _check(inputs, diff, LM_TOLERANCE), "metric": "perplexity", "measurements": rows,
            "threads": torch.get_num_threads(),
            "notes": [f"latency and throughput are full forward passes (no KV cache) over {one['input_ids'].shape[1]}"
                      f"-token (batch 1) and {big['input_ids'].shape[1]}-token (batch {len(big['input_ids'])}) "
                      "sequences, unlike the generation speed in the run summary"]
                     + ([] if teacher_logits is not None else ["agreement is not measured: no teacher to compare"])}


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
