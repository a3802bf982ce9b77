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


def _training_items(config, lora, freeze_embeddings: bool, recipe: Recipe, spec, length: int,  # type: ignore[no-untyped-def]
                    weights_name: str = "weights") -> list[MemoryItem]:
    """What training one model (a student arm, or the teacher in its stage) holds: fp32 weights, gradients and
    optimizer state of what trains, saved activations and the loss buffers."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if lora is not None:  # only the adapters train: their gradients and optimizer state
            model = with_lora(model, adapt.lora(lora))
    if freeze_embeddings:
        for head in (model.get_input_embeddings(), model.get_output_embeddings()):
            head.weight.requires_grad_(False)
    batch = spec.batch_size
    tokens, vocab = batch * length, config.vocab_size
    try:
        activations = _activation_bytes(config, batch, length)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        raise DistilError(f"cannot size the student's activations ({exc})") from None
    trainable = parameter_bytes(model, trainable=True)
    optimizer, detail = optimizer_bytes(spec, trainable)
    if recipe.loss.fused:
        chunk = recipe.loss.chunk_size or max(1, (1 << 25) // vocab)
        buffers, buffers_detail = FUSED_CHUNK_BUFFERS * min(chunk, tokens) * vocab * 4, f"fused, {chunk} tokens/chunk"
    else:
        buffers, buffers_detail = PLAIN_LOGIT_BUFFERS * tokens * vocab * 4, f"{tokens} tokens x {vocab} vocab, fp32"
    return [
        MemoryItem(weights_name, parameter_bytes(model), "fp32"),
        MemoryItem("gradients", trainable, "trainable parameters"),
        MemoryItem("optimizer state", optimizer, detail),
        MemoryItem("activations", activations, f"saved for backward, {batch} x {length} tokens"),
        MemoryItem("logits and loss buffers", buffers, buffers_detail),
    ]


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
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(t_config)
    t_dtype = teacher_dtype(t_spec.dtype, recipe.train.precision, device_kind(recipe.train.device))
    t_bytes = getattr(torch, t_dtype).itemsize if t_dtype else 4
    length = recipe.data.seq_len
    if recipe.method in RESPONSE_METHODS and recipe.generate is not None:
        length = min(length, 4 * recipe.generate.max_new_tokens + 256)  # prompt + answer, at most seq_len
    tokens = recipe.train.batch_size * length
    stages = []
    if recipe.teacher.train is not None:  # the teacher stage: the teacher trains alone, in fp32
        stages.append(StageEstimate("teacher", _training_items(t_config, recipe.teacher.lora, False, recipe,
                                                               recipe.teacher.train, recipe.data.seq_len)))
    student_items = _training_items(s_config, recipe.student.lora, recipe.student.freeze_embeddings, recipe,
                                    recipe.train, length, weights_name="student weights")
    cached = recipe.teacher.cache is not None
    for arm in recipe.arms:
        items = list(student_items)
        if arm in TEACHER_ARMS and recipe.method != "response" and not cached:
            teacher_weights = sum(p.numel() for p in teacher.parameters()) * t_bytes
            width = max(t_config.hidden_size, getattr(t_config, "intermediate_size", 0))
            items.insert(0, MemoryItem("teacher weights", teacher_weights, t_dtype or "float32"))
            items.append(MemoryItem("teacher forward", 3 * tokens * width * t_bytes, "largest layer, no grad"))
        stages.append(StageEstimate(arm, items))
    return MemoryEstimate("cuda" if recipe.train.device == "cuda" else "cpu", stages)
