"""The memory estimate of a causal-LM recipe (registered in `distil.estimate.ESTIMATORS`).

Teacher and student are built from their configs on the meta device (nothing is allocated); the student's saved
activations are traced on a meta batch exactly as for classifiers. What it counts per arm:

- teacher weights in their dtype (absent when the teacher is read from a cache), and the teacher's largest forward
  temporary (its MLP activation for the whole batch);
- student weights, gradients of the trainable ones (frozen embeddings excluded), fp32 AdamW states;
- activations saved for backward (traced), and the loss buffers: with the fused LM-head path a few
  `chunk x vocab` fp32 tensors; without it, the full `tokens x vocab` logits of both models, their log-softmaxes
  and the gradient (5 such tensors).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from distil.config import adapt
from distil.config.schema import RESPONSE_METHODS, TEACHER_ARMS, FromTeacherSpec, HFModelSpec, Recipe
from distil.errors import DistilError
from distil.estimate.memory import (EstimateUnavailable, MemoryEstimate, MemoryItem, StageEstimate, optimizer_bytes,
                                    parameter_bytes, trace_saved)
from distil.models.lora import with_lora
from distil.paths import cache_dir
from distil.precision import device_kind, teacher_dtype

FUSED_CHUNK_BUFFERS = 4  # student logits, teacher logits, their log-probs / the gradient, per chunk (fp32)
PLAIN_LOGIT_BUFFERS = 5


def _config_folder(source: str) -> Path:
    """A folder holding the model's config.json, without converting a GGUF built-in (which takes a while)."""
    from distil.models import hf

    if source in hf.BUILTIN_MODELS and hf.BUILTIN_MODELS[source].is_gguf:
        folder = cache_dir() / "models" / source
        if not (folder / "config.json").is_file():
            raise EstimateUnavailable(f"the memory estimate needs {source}'s config: it appears after the model's first "
                              f"conversion (any `distil run` with it, or `distil student {source} ...`)")
        return folder
    return hf.resolve_model_path(source)


def _student_config(teacher_config, spec: FromTeacherSpec):  # type: ignore[no-untyped-def]
    config = copy.deepcopy(teacher_config)
    layers = len(spec.layers) if spec.layers is not None else spec.num_layers
    for key, value in (("num_hidden_layers", layers), ("hidden_size", spec.hidden_size),
                       ("intermediate_size", spec.intermediate_size),
                       ("num_attention_heads", spec.num_attention_heads),
                       ("num_key_value_heads", spec.num_key_value_heads)):
        if value is not None:
            setattr(config, key, value)
    if spec.hidden_size is not None and getattr(config, "head_dim", None) is None:
        config.head_dim = teacher_config.hidden_size // teacher_config.num_attention_heads
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return config


def _activation_bytes(config, batch: int, length: int) -> int:  # type: ignore[no-untyped-def]
    """Bytes saved for backward by the student's forward, traced on real 1- and 2-layer copies of it with a tiny
    vocabulary (Llama's forward does not run on the meta device): base + layers x (per-layer difference)."""
    from transformers import AutoModelForCausalLM

    traced = []
    for layers in (1, 2):
        small = copy.deepcopy(config)
        small.num_hidden_layers, small.vocab_size, small.pad_token_id = layers, 64, None  # ids must fit 64 rows
        if getattr(small, "layer_types", None) is not None:
            small.layer_types = small.layer_types[:layers]
        model = AutoModelForCausalLM.from_config(small)
        ids = torch.zeros((batch, length), dtype=torch.long)
        traced.append(trace_saved(lambda: model.base_model(input_ids=ids, use_cache=False),
                                  exclude=list(model.parameters()))[0])
    per_layer = traced[1] - traced[0]
    return traced[0] - per_layer + config.num_hidden_layers * per_layer


def estimate_causal_lm(recipe: Recipe) -> MemoryEstimate:
    from transformers import AutoConfig, AutoModelForCausalLM

    t_spec = recipe.teacher.model
    assert isinstance(t_spec, HFModelSpec)
    t_config = AutoConfig.from_pretrained(_config_folder(t_spec.source))
    s_spec = recipe.student.model
    if isinstance(s_spec, FromTeacherSpec):
        s_config = _student_config(t_config, s_spec)
    else:
        assert isinstance(s_spec, HFModelSpec)
        s_config = AutoConfig.from_pretrained(_config_folder(s_spec.source))
    meta = torch.device("meta")
    with meta:
        teacher = AutoModelForCausalLM.from_config(t_config)
        student = AutoModelForCausalLM.from_config(s_config)
        if recipe.student.lora is not None:  # only the adapters train: their gradients and optimizer state
            student = with_lora(student, adapt.lora(recipe.student.lora))
    if recipe.student.freeze_embeddings:
        for head in (student.get_input_embeddings(), student.get_output_embeddings()):
            head.weight.requires_grad_(False)
    t_dtype = teacher_dtype(t_spec.dtype, recipe.train.precision, device_kind(recipe.train.device))
    t_bytes = getattr(torch, t_dtype).itemsize if t_dtype else 4
    batch, length = recipe.train.batch_size, recipe.data.seq_len
    if recipe.method in RESPONSE_METHODS and recipe.generate is not None:
        length = min(length, 4 * recipe.generate.max_new_tokens + 256)  # prompt + answer, at most seq_len
    tokens = batch * length
    vocab = s_config.vocab_size
    try:
        activations = _activation_bytes(s_config, batch, length)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        raise DistilError(f"cannot size the student's activations ({exc})") from None
    trainable = parameter_bytes(student, trainable=True)
    optimizer, detail = optimizer_bytes(recipe.train, trainable)
    if recipe.loss.fused:
        chunk = recipe.loss.chunk_size or max(1, (1 << 25) // vocab)
        buffers, buffers_detail = FUSED_CHUNK_BUFFERS * min(chunk, tokens) * vocab * 4, f"fused, {chunk} tokens/chunk"
    else:
        buffers, buffers_detail = PLAIN_LOGIT_BUFFERS * tokens * vocab * 4, f"{tokens} tokens x {vocab} vocab, fp32"
    cached = recipe.teacher.cache is not None
    stages = []
    for arm in recipe.arms:
        with_teacher = arm in TEACHER_ARMS and recipe.method != "response"
        items = [
            MemoryItem("student weights", parameter_bytes(student), "fp32"),
            MemoryItem("gradients", trainable, "trainable parameters"),
            MemoryItem("optimizer state", optimizer, detail),
            MemoryItem("activations", activations, f"saved for backward, {batch} x {length} tokens"),
            MemoryItem("logits and loss buffers", buffers, buffers_detail),
        ]
        if with_teacher and not cached:
            teacher_weights = sum(p.numel() for p in teacher.parameters()) * t_bytes
            width = max(t_config.hidden_size, getattr(t_config, "intermediate_size", 0))
            items.insert(0, MemoryItem("teacher weights", teacher_weights, t_dtype or "float32"))
            items.append(MemoryItem("teacher forward", 3 * tokens * width * t_bytes, "largest layer, no grad"))
        stages.append(StageEstimate(arm, items))
    return MemoryEstimate("cuda" if recipe.train.device == "cuda" else "cpu", stages)
