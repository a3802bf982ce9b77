"""Attention probabilities and q/k/v for chosen layers of models that run SDPA or flash attention.

Such kernels never materialise the attention matrix, and forcing eager attention on every layer costs memory and time
on all of them. Instead, `AttentionRecorder` hooks the query/key/value projections of the chosen attention modules
(plus the module's call arguments: rotary cos/sin and the attention mask) and recomputes, for those layers only,

    softmax(q k^T * scaling + mask)        (float32)

exactly as the model's eager path does. Supported layouts (detected from the module's children):

- Llama family (LlamaAttention and look-alikes: Mistral, Qwen2, Qwen3, SmolLM...): `q_proj`/`k_proj`/`v_proj`, rotary
  position embeddings from the `position_embeddings` argument (rotate-half convention, full head dim), grouped KV
  heads (query head h reads KV head h // (H / H_kv)), optional per-head `q_norm`/`k_norm` (Qwen3);
- BERT family (BertSelfAttention: all-MiniLM-L6-v2 and other BertModels): `query`/`key`/`value`, no rotary.

The mask is the one the model passed to the layer when it is a 4-D tensor (boolean for SDPA, additive for eager), so
padding, causality and sliding windows are reproduced as the model applied them. When the model passed none (SDPA
with no padding) or a 2-D padding mask (flash attention), the mask is built from the module's `is_causal` and that
padding mask (or `padding_mask=` given to `probs`). Attention dropout is not applied: these are the clean
probabilities, the right target for distillation. Query rows with no visible key (padding queries under left padding)
come out uniform, as in eager attention; losses exclude them through their query mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from distil.distill.taps import HookGroup, resolve_module_names
from distil.errors import DistilError

_LAYOUTS = {"llama": ("q_proj", "k_proj", "v_proj"), "bert": ("query", "key", "value")}


def _layout(module: nn.Module) -> str | None:
    for layout, children in _LAYOUTS.items():
        if all(isinstance(getattr(module, c, None), nn.Module) for c in children):
            return layout
    return None


def find_attention_modules(model: nn.Module) -> list[str]:
    """Names of the self-attention modules this recorder understands, in model order (one per layer)."""
    return [name for name, m in model.named_modules() if name and _layout(m) is not None]


def _head_dim(module: nn.Module, layout: str) -> int:
    d = getattr(module, "head_dim", None) if layout == "llama" else getattr(module, "attention_head_size", None)
    if not isinstance(d, int) or d < 1:
        raise DistilError(f"{type(module).__name__} has no usable head size attribute "
                          f"({'head_dim' if layout == 'llama' else 'attention_head_size'}); cannot recompute attention")
    return d


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Record:
    def __init__(self, name: str, module: nn.Module, layout: str) -> None:
        self.name, self.module, self.layout = name, module, layout
        self.head_dim = _head_dim(module, layout)
        self.tensors: dict[str, torch.Tensor] = {}
        self.call: dict[str, Any] = {}


class AttentionRecorder(HookGroup):
    """Context manager: record q/k/v of the chosen attention layers and recompute their probabilities.

        with AttentionRecorder(model, [0, 3]) as rec:      # layer indices, module names or glob patterns
            model(input_ids, attention_mask=attn)
        probs = rec.probs(rec.names[0])                  # [B, H, Q, K] float32, graph kept for a student
        q, k, v = rec.projections(rec.names[0])          # [B, S, width] each, the MiniLMv2 relation inputs
    """

    _already_attached = "this AttentionRecorder is already attached; use one `with` block at a time"

    def __init__(self, model: nn.Module, layers: int | str | Sequence[int | str]) -> None:
        self.model = model
        if isinstance(layers, (int, str)):
            layers = [layers]
        found = find_attention_modules(model)
        if not found:
            raise DistilError(f"{type(model).__name__} has no attention module with q_proj/k_proj/v_proj or "
                              "query/key/value projections; attention recomputation supports Llama- and BERT-style "
                              "attention (use an eager model with output_attentions=True otherwise)")
        names: list[str] = []
        for layer in layers:
            if isinstance(layer, int) and not isinstance(layer, bool):
                if not -len(found) <= layer < len(found):
                    raise DistilError(f"attention layer {layer} is out of range; the model has {len(found)} "
                                      f"attention layers (0..{len(found) - 1})")
                names.append(found[layer])
                continue
            for name in resolve_module_names(model, layer):
                if name not in found:
                    raise DistilError(f"module {name!r} is not a supported attention module; attention modules: "
                                      f"{', '.join(found[:4])}{' ...' if len(found) > 4 else ''}")
                names.append(name)
        modules = dict(model.named_modules())
        self.names: list[str] = list(dict.fromkeys(names))
        self._records = {n: _Record(n, modules[n], _layout(modules[n])) for n in self.names}
        super().__init__()
        for rec in self._records.values():
            config = getattr(rec.module, "config", None)
            if getattr(config, "attn_logit_softcapping", None) or hasattr(rec.module, "sinks"):
                raise DistilError(f"{rec.name}: logit soft-capping / attention sinks are not reproduced by the "
                                  "recomputation; load this model with attn_implementation='eager' instead")

    # -- hooks ------------------------------------------------------------------------------------------------
    def _store(self, rec: _Record, key: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rec.tensors[key] = output
        return hook

    def _call_hook(self, rec: _Record):
        try:
            params = list(inspect.signature(rec.module.forward).parameters)
        except (TypeError, ValueError):
            params = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = dict(zip(params, args))
            call.update(kwargs)
            cache = call.get("cache", call.get("past_key_values"))
            past = 0
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length(getattr(module, "layer_idx", 0) or 0))
            rec.call = {"position_embeddings": call.get("position_embeddings"),
                        "attention_mask": call.get("attention_mask"), "past": past}
        return hook

    def _register(self) -> Iterator[torch.utils.hooks.RemovableHandle]:
        for rec in self._records.values():
            q, k, v = _LAYOUTS[rec.layout]
            for key, child in (("q", q), ("k", k), ("v", v), ("q_norm", "q_norm"), ("k_norm", "k_norm")):
                sub = getattr(rec.module, child, None)
                if isinstance(sub, nn.Module):
                    yield sub.register_forward_hook(self._store(rec, key))
            yield rec.module.register_forward_pre_hook(self._call_hook(rec), with_kwargs=True)

    def clear(self) -> None:
        for rec in self._records.values():
            rec.tensors.clear()
            rec.call = {}

    # -- results ----------------------------------------------------------------------------------------------
    def _record(self, name: str) -> _Record:
        rec = self._records.get(name)
        if rec is None:
            raise DistilError(f"{name!r} is not recorded; recorded attention modules: {', '.join(self.names)}")
        if not all(k in rec.tensors for k in "qkv") or not rec.call:
            raise DistilError(f"attention module {name!r} has not run since the recorder was attached; "
                              "call the model inside the `with AttentionRecorder(...)` block first")
        if rec.call["past"]:
            raise DistilError(f"{name!r} ran with {rec.call['past']} cached past tokens; recomputed attention needs "
                              "the full sequence in one call (use_cache=False)")
        return rec

    def projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The raw query, key and value projection outputs [B, S, width] (before norms and rotary): all heads
        concatenated, as `minilm_relations` expects. With grouped KV heads, keys and values are narrower."""
        rec = self._record(name)
        return rec.tensors["q"], rec.tensors["k"], rec.tensors["v"]

    def states(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query [B, H, S, d], key and value [B, H_kv, S, d] as the attention kernel sees them: per-head norms and
        rotary embeddings applied, KV heads not repeated."""
        rec = self._record(name)
        d = rec.head_dim
        q = rec.tensors.get("q_norm", rec.tensors["q"])
        k = rec.tensors.get("k_norm", rec.tensors["k"])
        v = rec.tensors["v"]
        q, k, v = (x.reshape(*x.shape[:2], -1, d).transpose(1, 2) for x in (q, k, v))
        if rec.layout == "llama":
            pe = rec.call["position_embeddings"]
            if pe is None:
                raise DistilError(f"{name!r} was called without position_embeddings (rotary cos/sin); "
                                  "this model family is not supported by attention recomputation")
            cos, sin = (x.unsqueeze(1) for x in pe)
            if cos.shape[-1] != d:
                raise DistilError(f"{name!r} applies rotary embeddings to {cos.shape[-1]} of {d} head dims; "
                                  "partial rotary is not supported by attention recomputation")
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _scores_mask(self, rec: _Record, q_len: int, k_len: int, batch: int, device: torch.device,
                     padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A boolean [B|1, 1, Q, K] mask (True attends) or an additive float mask, or None."""
        mask = rec.call.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            return mask[..., :q_len, :k_len]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            padding_mask = mask
        elif mask is not None and padding_mask is None:
            raise DistilError(f"{rec.name!r} received a {type(mask).__name__} attention mask that cannot be read; "
                              "pass padding_mask= (the [batch, seq] attention_mask) to probs()")
        allowed = None
        if getattr(rec.module, "is_causal", False):
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
        if padding_mask is not None:
            if padding_mask.shape != (batch, k_len):
                raise DistilError(f"padding mask shape {list(padding_mask.shape)} must be [batch, seq] = "
                                  f"{[batch, k_len]}")
            pad = padding_mask.bool().to(device)[:, None, None, :]
            allowed = pad if allowed is None else allowed & pad
        return allowed

    def probs(self, name: str, *, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities [B, H, Q, K] in float32, equal to what eager attention returns for this layer.

        padding_mask [B, S] (1 = real token) is needed only when the model gave the layer no readable mask."""
        rec = self._record(name)
        q, k, _ = self.states(name)
        q, k = q.float(), k.float()
        heads, kv_heads = q.shape[1], k.shape[1]
        if heads % kv_heads:
            raise DistilError(f"{name!r}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        scaling = getattr(rec.module, "scaling", None) or rec.head_dim ** -0.5
        scores = (q @ k.transpose(-1, -2)) * scaling
        mask = self._scores_mask(rec, q.shape[2], k.shape[2], q.shape[0], q.device, padding_mask)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask.float()
        return scores.softmax(dim=-1)
