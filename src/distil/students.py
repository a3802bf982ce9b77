"""Students built from teachers: chosen layers copied, width reduced by importance, every weight inherited.

The student is a standard Hugging Face model of the teacher's own class and config type, so it saves and loads with
plain transformers. Depth follows DistilBERT (copy a subset of layers); width follows NVIDIA's Minitron (keep the
hidden channels, MLP neurons and attention heads with the largest mean |activation| on a few calibration batches,
or the largest weight norms without them). Supported: Llama-family decoders and BERT-family encoders.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from distil.errors import DistilError
from distil.measure.cost import folder_size
from distil.models.importance import activation_scores, empty_scores, magnitude_scores
from distil.models.layouts import family_of, Geometry, layer_prefix, Layout, teacher_geometry, weight_axes


@dataclass
class StudentPlan:
    """What a student keeps of its teacher: indices into the teacher, per student layer where they vary."""

    layers: list[int]  # teacher layer copied into each student layer
    hidden: torch.Tensor  # kept hidden (embedding) channels, ascending
    heads: list[torch.Tensor]  # kept query heads, grouped by kept KV head
    kv_heads: list[torch.Tensor]  # kept KV heads, ascending
    neurons: list[torch.Tensor]  # kept MLP neurons, ascending
    geometry: Geometry
    config: Any = field(repr=False)


def parse_layers(text: str) -> list[int]:
    """``"0,2,4"`` -> ``[0, 2, 4]`` (for the CLI's --layers)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistilError(f"--layers {text!r}: give comma-separated layer indices, e.g. 0,2,4") from None


def choose_layers(n_teacher: int, layers: list[int] | None = None, num_layers: int | None = None) -> list[int]:
    """Teacher layers to copy: ``layers`` as given, or ``num_layers`` spread evenly keeping the first and last."""
    if layers is not None and num_layers is not None:
        raise DistilError("give either layers or num_layers, not both")
    if layers is not None:
        layers = [int(i) for i in layers]
        if not layers:
            raise DistilError("layers is empty; list at least one teacher layer to copy")
        bad = [i for i in layers if not 0 <= i < n_teacher]
        if bad:
            raise DistilError(f"layer indices {bad} are out of range: the teacher has layers 0..{n_teacher - 1}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise DistilError(f"layers {layers} must be strictly increasing, each teacher layer at most once")
        return layers
    if num_layers is None:
        return list(range(n_teacher))
    if not 1 <= num_layers <= n_teacher:
        raise DistilError(f"num_layers={num_layers} must be between 1 and the teacher's {n_teacher} layers")
    if num_layers == 1:
        return [0]
    step = (n_teacher - 1) / (num_layers - 1)  # >= 1, so the rounded indices are distinct
    return [int(j * step + 0.5) for j in range(num_layers)]


def _target_geometry(t: Geometry, layout: Layout, n_layers: int, hidden_size: int | None,
                     intermediate_size: int | None, heads: int | None, kv_heads: int | None) -> Geometry:
    if not layout.gqa:  # BERT: hidden = heads * head_dim, and every head is its own KV head
        if hidden_size is not None and hidden_size % t.head_dim:
            raise DistilError(f"hidden_size={hidden_size} must be a multiple of the head size {t.head_dim} "
                              f"(hidden = attention heads x {t.head_dim} in this family)")
        if hidden_size is not None and heads is not None and hidden_size != heads * t.head_dim:
            raise DistilError(f"hidden_size={hidden_size} and num_attention_heads={heads} disagree: this family "
                              f"needs hidden_size = heads x {t.head_dim}; give only one of them")
        if heads is None and hidden_size is not None:
            heads = hidden_size // t.head_dim
        if hidden_size is None and heads is not None:
            hidden_size = heads * t.head_dim
        if kv_heads is not None and kv_heads != (heads or t.num_attention_heads):
            raise DistilError("BERT-family encoders have one key/value head per attention head; "
                              "leave num_key_value_heads unset")
    hidden = t.hidden_size if hidden_size is None else hidden_size
    inter = t.intermediate_size if intermediate_size is None else intermediate_size
    heads = t.num_attention_heads if heads is None else heads
    for name, value, limit in (("hidden_size", hidden, t.hidden_size), ("intermediate_size", inter,
                               t.intermediate_size), ("num_attention_heads", heads, t.num_attention_heads)):
        if not 1 <= value <= limit:
            raise DistilError(f"{name}={value} must be between 1 and the teacher's {limit}")
    group = t.num_attention_heads // t.num_key_value_heads
    if kv_heads is None:
        kv_heads = heads if group == 1 else t.num_key_value_heads
    fits = [k for k in range(1, t.num_key_value_heads + 1) if heads % k == 0 and heads // k <= group]
    if kv_heads not in fits:
        raise DistilError(
            f"{heads} attention heads over {kv_heads} key/value heads is not valid grouped-query attention for this "
            f"teacher ({t.num_attention_heads} heads in {t.num_key_value_heads} groups of {group}): heads must divide "
            f"evenly and each kept KV head keeps at most {group} of its own heads; num_key_value_heads can be "
            f"{', '.join(map(str, fits)) or 'nothing (choose another num_attention_heads)'}"
        )
    return Geometry(n_layers, hidden, inter, heads, kv_heads, t.head_dim)


def _index(kind: str | None, plan: StudentPlan, j: int | None) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "hidden":
        return plan.hidden
    if kind == "neurons":
        return plan.neurons[j]
    heads = plan.heads[j] if kind == "heads" else plan.kv_heads[j]
    hd = plan.geometry.head_dim
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _student_config(teacher, layout: Layout, layers: list[int], g: Geometry):
    config = copy.deepcopy(teacher.config)
    n_teacher = teacher.config.num_hidden_layers
    config.num_hidden_layers = g.num_layers
    config.hidden_size = g.hidden_size
    config.intermediate_size = g.intermediate_size
    config.num_attention_heads = g.num_attention_heads
    if layout.gqa:
        config.num_key_value_heads = g.num_key_value_heads
        config.head_dim = g.head_dim
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_teacher:  # sliding/full attention per layer
        config.layer_types = [layer_types[i] for i in layers]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    return config


def plan_student(
    teacher: nn.Module,
    *,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    calibration: Iterable[Mapping[str, Any]] | None = None,
) -> StudentPlan:
    """Decide what the student keeps (see make_student); nothing is built."""
    layout, prefix = family_of(teacher)
    t = teacher_geometry(teacher)
    chosen = choose_layers(t.num_layers, layers, num_layers)
    g = _target_geometry(t, layout, len(chosen), hidden_size, intermediate_size, num_attention_heads,
                         num_key_value_heads)
    n = len(chosen)
    if (g.hidden_size, g.intermediate_size, g.num_attention_heads, g.num_key_value_heads) == (
            t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads):
        scores = empty_scores(t, n)  # depth only: every channel is kept, no ranking needed
    elif calibration is not None:
        scores = activation_scores(teacher, layout, prefix, chosen, t, calibration)
    else:
        scores = magnitude_scores(teacher, layout, prefix, chosen, t)
    group, per_kv = t.num_attention_heads // t.num_key_value_heads, g.num_attention_heads // g.num_key_value_heads
    heads, kv_heads = [], []
    for j in range(n):
        h = scores["heads"][j]
        groups = _top(h.view(-1, group).sum(-1) + scores["kv"][j], g.num_key_value_heads)
        kv_heads.append(groups)
        heads.append(torch.cat([k * group + _top(h[k * group:(k + 1) * group], per_kv) for k in groups.tolist()]))
    return StudentPlan(
        layers=chosen,
        hidden=_top(scores["hidden"], g.hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        neurons=[_top(scores["neurons"][j], g.intermediate_size) for j in range(n)],
        geometry=g,
        config=_student_config(teacher, layout, chosen, g),
    )


def build_student(teacher: nn.Module, plan: StudentPlan) -> nn.Module:
    """A new model of the teacher's class whose every weight is a slice of the teacher's, per ``plan``."""
    layout, prefix = family_of(teacher)
    param = next(teacher.parameters())
    student = type(teacher)(plan.config).to(device=param.device, dtype=param.dtype)
    pattern = re.compile(re.escape(layer_prefix(layout, prefix)) + r"(\d+)\.")
    t_state = teacher.state_dict()
    new_state = {}
    for key, target in student.state_dict().items():
        m = pattern.match(key)
        j = int(m.group(1)) if m else None
        t_key = pattern.sub(f"{layer_prefix(layout, prefix)}{plan.layers[j]}.", key, count=1) if m else key
        if t_key not in t_state:
            raise DistilError(f"the student's {key} has no counterpart {t_key} in the teacher")
        tensor = t_state[t_key].detach()
        _, axes = weight_axes(teacher, layout, prefix, t_key, tensor.shape, teacher.config.hidden_size)
        for d, kind in enumerate(axes):
            idx = _index(kind, plan, j)
            if idx is not None:
                tensor = tensor.index_select(d, idx.to(tensor.device))
        if tensor.shape != target.shape:
            raise DistilError(f"internal error: {key} sliced to {tuple(tensor.shape)}, student expects "
                              f"{tuple(target.shape)}")
        new_state[key] = tensor  # load_state_dict copies: the student never shares memory with the teacher
    student.load_state_dict(new_state, strict=True)
    if getattr(teacher, "generation_config", None) is not None and getattr(student, "generation_config", None):
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def make_student(
    teacher: nn.Module,
    *,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    calibration: Iterable[Mapping[str, Any]] | None = None,
) -> nn.Module:
    """A smaller model of the teacher's family with inherited weights (returned in eval mode, like from_pretrained).

    Depth: ``layers`` (teacher layer indices, strictly increasing, e.g. DistilBERT's [0, 2, 4, 7, 9, 11]) or
    ``num_layers`` spread evenly keeping the first and last; all layers when neither is given.
    Width: ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` keep the most
    important channels, neurons and heads, ranked by mean |activation| over ``calibration`` (an iterable of model-input
    dicts) when given, by weight norm otherwise. Head size is unchanged; query heads are kept inside their own KV
    group, so grouped-query attention stays valid. Embeddings, norms, LM head (tied or not) and task heads are sliced
    along the same hidden channels. Raises DistilError for unsupported families or invalid sizes."""
    config = getattr(teacher, "config", None)
    if getattr(config, "model_type", None) == "mpnet" and (
            num_attention_heads not in (None, config.num_attention_heads)
            or hidden_size not in (None, config.hidden_size)):
        raise DistilError("MPNet shares one relative-position bias across its layers' heads, so make_student keeps "
                          "every head (and so the hidden size): reduce layers or intermediate_size only")
    plan = plan_student(teacher, layers=layers, num_layers=num_layers, hidden_size=hidden_size,
                        intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                        num_key_value_heads=num_key_value_heads, calibration=calibration)
    return build_student(teacher, plan)


def save_student(teacher: str, output: Path, **make_student_kwargs: Any) -> dict[str, Any]:
    """Build a student from a teacher (local folder or built-in name) and save it with the teacher's tokenizer to
    ``output`` (which must not exist or be empty; written atomically). Returns the layers kept and, for teacher and
    student, parameters, bytes in memory and on disk, and geometry (what ``distil student`` prints)."""
    from transformers import AutoTokenizer

    from distil.models import hf

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DistilError(f"output {output} already exists and is not an empty folder; choose a new -o folder")
    teacher_path = hf.resolve_model_path(teacher)
    model = hf.load_model(teacher_path)
    student = make_student(model, **make_student_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError):
        tokenizer = None  # a model folder without a tokenizer: the student is saved without one too
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def describe(m: nn.Module, folder: Path) -> dict[str, Any]:
        return {**hf.model_size(m), "disk_bytes": folder_size(folder), **vars(teacher_geometry(m))}

    return {"teacher": describe(model, teacher_path), "student": describe(student, output),
            "layers": choose_layers(model.config.num_hidden_layers, make_student_kwargs.get("layers"),
                                    make_student_kwargs.get("num_layers")), "output": str(output)}
