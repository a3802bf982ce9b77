"""Where each supported transformer family keeps its per-layer parts, its geometry, and which axis of each weight
a student can reduce (hidden channels, MLP neurons, query or KV heads)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from distil.errors import DistilError


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its per-layer parts, relative to the backbone and to one layer."""

    layers: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # read the residual stream, write the MLP neurons
    mlp_out: str
    norms: tuple[str, ...]  # residual-stream norms: sliced to the kept hidden channels
    head_norms: tuple[str, ...] = ()  # per-head norms (size head_dim): kept whole
    gqa: bool = True  # config carries num_key_value_heads and head_dim


DECODER = Layout("layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", ("input_layernorm", "post_attention_layernorm"),
                   ("self_attn.q_norm", "self_attn.k_norm"))
ENCODER = Layout("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", ("intermediate.dense",), "output.dense",
                   ("attention.output.LayerNorm", "output.LayerNorm"), gqa=False)
MPNET = Layout("encoder.layer", "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                ("intermediate.dense",), "output.dense", ("attention.LayerNorm", "output.LayerNorm"), gqa=False)
VIT = Layout("layers", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", ("mlp.fc1",),
             "mlp.fc2", ("layernorm_before", "layernorm_after"), gqa=False)
FAMILIES = {"llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER,
             "bert": ENCODER, "roberta": ENCODER, "mpnet": MPNET, "vit": VIT}


@dataclass(frozen=True)
class Geometry:
    """The shape of a transformer stack."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


def family_of(teacher: nn.Module) -> tuple[Layout, str]:
    config = getattr(teacher, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not hasattr(teacher, "base_model"):
        raise DistilError(
            f"make_student supports Llama-family decoders and BERT-family encoders "
            f"({', '.join(sorted(FAMILIES))}); {type(teacher).__name__} (model_type {model_type!r}) is not one; "
            "pick layers and sizes by hand and build that student with transformers instead"
        )
    prefix = next(name for name, module in teacher.named_modules() if module is teacher.base_model)
    return FAMILIES[model_type], prefix


def teacher_geometry(teacher: nn.Module) -> Geometry:
    """Layers, widths and heads of a supported teacher."""
    layout, _ = family_of(teacher)
    c = teacher.config
    heads = c.num_attention_heads
    if layout.gqa:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
    else:
        head_dim, kv = c.hidden_size // heads, heads
    return Geometry(c.num_hidden_layers, c.hidden_size, c.intermediate_size, heads, kv, head_dim)


def layer_prefix(layout: Layout, prefix: str) -> str:
    return f"{prefix}.{layout.layers}." if prefix else f"{layout.layers}."


def weight_axes(teacher: nn.Module, layout: Layout, prefix: str, key: str, shape: torch.Size, hidden: int):
    """For a state-dict key: its layer index (None outside the layers) and what each dimension indexes."""
    m = re.match(re.escape(layer_prefix(layout, prefix)) + r"(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        i, part, kind = int(m.group(1)), m.group(2), m.group(3)
        roles = {layout.q: "heads", layout.k: "kv", layout.v: "kv", layout.o: "out", layout.mlp_out: "mlp_out",
                 **{name: "neurons" for name in layout.mlp_in}, **{name: "norm" for name in layout.norms},
                 **{name: "keep" for name in layout.head_norms}}
        role = roles.get(part)
        if role in ("heads", "kv", "neurons"):
            return i, (role, "hidden") if kind == "weight" else (role,)
        if role in ("out", "mlp_out"):
            inner = "heads" if role == "out" else "neurons"
            return i, ("hidden", inner) if kind == "weight" else ("hidden",)
        if role == "norm":
            return i, ("hidden",)
        if role == "keep":
            return i, (None,) * len(shape)
        raise DistilError(f"make_student does not know how to reduce {key}; this layer variant is not supported")
    owner = teacher.get_submodule(key.rsplit(".", 1)[0]) if "." in key else teacher
    name = key.rsplit(".", 1)[-1]
    if key.endswith("relative_attention_bias.weight"):  # MPNet: [buckets, heads], heads kept whole
        return None, (None, None)
    if name in ("cls_token", "mask_token", "position_embeddings"):  # ViT: [1, tokens, hidden] parameters
        return None, (None,) * (len(shape) - 1) + ("hidden",)
    if isinstance(owner, nn.Conv2d) and name == "weight":  # ViT's patch projection: [hidden, channels, p, p]
        return None, ("hidden" if shape[0] == hidden else None, None, None, None)
    if isinstance(owner, nn.Embedding) and name == "weight":
        return None, (None, "hidden")
    if isinstance(owner, nn.Linear) and name == "weight":  # LM head, pooler, classifier, MLM transform
        return None, tuple("hidden" if n == hidden else None for n in shape)
    if len(shape) == 1:  # norms and biases of the residual stream; other vectors (e.g. vocab biases) kept whole
        return None, ("hidden" if shape[0] == hidden else None,)
    if hidden in shape:
        raise DistilError(f"make_student does not know how to reduce {key} ({type(owner).__name__})")
    return None, (None,) * len(shape)
