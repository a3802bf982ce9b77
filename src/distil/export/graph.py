"""ONNX graphs of students, onnxruntime sessions to run them, and dynamic int8 quantization.

The exporter is torch's default, the dynamo-based `torch.onnx.export(..., dynamo=True)` (it needs onnxscript): it
traces through torch.export with symbolic batch and sequence sizes, so shape-dependent branches (Llama's attention
mask, causal or not) stay general instead of being frozen at the example's sizes, as the older TorchScript tracer
does (with TracerWarnings) for transformers' Llama. Language models are exported without a KV cache
(`use_cache=False`): inputs `input_ids` and `attention_mask` `[batch, sequence]`, output `logits`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distil.errors import DistilError

OPSET = 18
SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's 2 GB cap on one file; larger models keep weights in model.onnx.data
# Conv is left in float: onnxruntime's CPU ConvInteger takes uint8 weights only, and int8 weights are the ones that
# keep accuracy. Embedding tables (Gather) are large in language models and quantize well.
INT8_OP_TYPES = ["MatMul", "Gemm", "Gather"]


class ClassifierGraph(nn.Module):
    """A classifier with one named input, `pixels`, and its logits as the output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


class CausalLMGraph(nn.Module):
    """A causal LM without KV cache: `(input_ids, attention_mask) -> logits`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def onnx_files(path: Path) -> list[Path]:
    """The graph file and, when the weights live outside it, their data file."""
    path = Path(path)
    return [p for p in (path, path.with_name(path.name + ".data")) if p.is_file()]


def onnx_size(path: Path) -> int:
    return sum(p.stat().st_size for p in onnx_files(path))


def export_graph(graph: nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, dict[int, str]],
                 path: Path) -> None:
    """Export `graph` called with `example` (keyword tensors) to `path`, with the named axes of `dynamic` symbolic.

    The example's dynamic sizes must be at least 2: torch.export specialises sizes 0 and 1.
    """
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = {name: {axis: dims.setdefault(label, Dim(label, min=1)) for axis, label in axes.items()}
              for name, axes in dynamic.items()}
    weights = sum(p.numel() * p.element_size() for p in graph.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in onnx_files(path):
        stale.unlink()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter from export internals, not about this model
            torch.onnx.export(graph.eval(), (), str(path), kwargs=example, input_names=list(example),
                              output_names=["logits"], dynamic_shapes=shapes, dynamo=True, opset_version=OPSET,
                              external_data=weights > SINGLE_FILE_LIMIT, verbose=False)
    except Exception as exc:  # the exporter raises many types; say which model failed and keep the cause
        raise DistilError(f"ONNX export of {type(graph.model).__name__} failed: {exc}".splitlines()[0]) from exc
    finally:
        quiet.setLevel(level)


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session using as many threads as torch does, so that latencies compare fairly."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(sess: Any) -> Callable[[Any], torch.Tensor]:
    """Call a session like a model: a tensor (single input) or a dict of tensors in, logits as a tensor out."""
    names = [i.name for i in sess.get_inputs()]

    def run(batch: Any) -> torch.Tensor:
        feeds = batch if isinstance(batch, dict) else {names[0]: batch}
        arrays = {k: np.ascontiguousarray(v.cpu().numpy()) for k, v in feeds.items() if k in names}
        return torch.from_numpy(sess.run(None, arrays)[0])

    return run


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization (weights int8 ahead of time, activations quantized on the fly) of MatMul, Gemm and
    Gather (embeddings); see INT8_OP_TYPES. Shape inference runs first, as onnxruntime recommends."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in onnx_files(target):
        stale.unlink()
    large = onnx_size(source) > SINGLE_FILE_LIMIT
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, save_as_external_data=large)
        except Exception:  # pre-processing only helps; quantize the graph as exported when it cannot run
            shutil.copy(source, prepared)
            for extra in onnx_files(source)[1:]:
                shutil.copy(extra, Path(tmp) / extra.name)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OP_TYPES,
                         use_external_data_format=large)
