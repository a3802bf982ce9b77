"""How important each hidden channel, MLP neuron and attention head of a teacher is, for the students of
:mod:`distil.students`: by weight norm, or by mean |activation| over calibration batches (Minitron)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from distil.errors import DistilError
from distil.models.layouts import Geometry, weight_axes


def magnitude_scores(teacher, layout, prefix, layers, t: Geometry) -> dict[str, Any]:
    """Importance by weight norms: the squared norm of every inherited weight along each prunable axis."""
    scores = empty_scores(t, len(layers))
    student_of = {i: j for j, i in enumerate(layers)}
    seen = set()
    for key, tensor in teacher.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(tensor.data_ptr())
        i, axes = weight_axes(teacher, layout, prefix, key, tensor.shape, t.hidden_size)
        if i is not None and i not in student_of:
            continue
        sq = tensor.detach().float().pow(2)
        for d, kind in enumerate(axes):
            if kind is None:
                continue
            along = sq.sum(dim=[x for x in range(sq.dim()) if x != d]) if sq.dim() > 1 else sq
            along = along.cpu()  # scores live on the CPU whatever the teacher's device
            if kind in ("heads", "kv"):
                along = along.view(-1, t.head_dim).sum(-1)
            if kind == "hidden":
                scores["hidden"] += along
            else:
                scores[kind][student_of[i]] += along
    return scores


def empty_scores(t: Geometry, n: int) -> dict[str, Any]:
    return {"hidden": torch.zeros(t.hidden_size),
            "heads": [torch.zeros(t.num_attention_heads) for _ in range(n)],
            "kv": [torch.zeros(t.num_key_value_heads) for _ in range(n)],
            "neurons": [torch.zeros(t.intermediate_size) for _ in range(n)]}


def activation_scores(teacher, layout, prefix, layers, t: Geometry, calibration) -> dict[str, Any]:
    """Minitron's importance: mean |activation| over the calibration tokens (padding excluded) of each hidden
    channel (at the outputs of the residual-stream norms), MLP neuron (input of the down projection) and head
    (L2 norm of its output, input of the output projection)."""
    scores = empty_scores(t, len(layers))
    state: dict[str, Any] = {"mask": None}

    def token_sum(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        mask = state["mask"]
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x * mask.to(x.device, x.dtype).unsqueeze(-1)
        return x.reshape(-1, x.shape[-1]).sum(0).cpu()

    def on_norm(module, args, output):
        scores["hidden"].add_(token_sum(output.abs()))

    def on_heads(j):
        def hook(module, args):
            x = args[0]
            scores["heads"][j].add_(token_sum(x.unflatten(-1, (-1, t.head_dim)).norm(dim=-1)))
        return hook

    def on_neurons(j):
        def hook(module, args):
            scores["neurons"][j].add_(token_sum(args[0].abs()))
        return hook

    base = teacher.get_submodule(prefix) if prefix else teacher
    stack = base.get_submodule(layout.layers)
    handles = []
    for j, i in enumerate(layers):
        layer = stack[i]
        handles += [layer.get_submodule(n).register_forward_hook(on_norm) for n in layout.norms]
        handles.append(layer.get_submodule(layout.o).register_forward_pre_hook(on_heads(j)))
        handles.append(layer.get_submodule(layout.mlp_out).register_forward_pre_hook(on_neurons(j)))
    for name, module in base.named_modules():  # norms outside the layers: embeddings LayerNorm, final norm
        if not name.startswith(layout.layers) and type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            handles.append(module.register_forward_hook(on_norm))
    device = next(teacher.parameters()).device
    was_training, n_batches = teacher.training, 0
    teacher.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                if not isinstance(batch, Mapping):
                    raise DistilError("calibration must yield dicts of model inputs (input_ids, attention_mask, ...)")
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                state["mask"] = batch.get("attention_mask")
                teacher(**batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    if n_batches == 0:
        raise DistilError("calibration gave no batches; pass a few batches of model inputs, or None to rank by "
                          "weight magnitude")
    return scores
