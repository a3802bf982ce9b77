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


@dataclass(frozen=True)
class _Layout:
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


_DECODER = _Layout("layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", ("input_layernorm", "post_attention_layernorm"),
                   ("self_attn.q_norm", "self_attn.k_norm"))
_ENCODER = _Layout("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", ("intermediate.dense",), "output.dense",
                   ("attention.output.LayerNorm", "output.LayerNorm"), gqa=False)
_FAMILIES = {"llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
             "bert": _ENCODER, "roberta": _ENCODER}


@dataclass(frozen=True)
class Geometry:
    """The shape of a transformer stack."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


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


def _family(teacher: nn.Module) -> tuple[_Layout, str]:
    config = getattr(teacher, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES or not hasattr(teacher, "base_model"):
        raise DistilError(
            f"make_student supports Llama-family decoders and BERT-family encoders "
            f"({', '.join(sorted(_FAMILIES))}); {type(teacher).__name__} (model_type {model_type!r}) is not one; "
            "pick layers and sizes by hand and build that student with transformers instead"
        )
    prefix = next(name for name, module in teacher.named_modules() if module is teacher.base_model)
    return _FAMILIES[model_type], prefix


def teacher_geometry(teacher: nn.Module) -> Geometry:
    """Layers, widths and heads of a supported teacher."""
    layout, _ = _family(teacher)
    c = teacher.config
    heads = c.num_attention_heads
    if layout.gqa:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
    else:
        head_dim, kv = c.hidden_size // heads, heads
    return Geometry(c.num_hidden_layers, c.hidden_size, c.intermediate_size, heads, kv, head_dim)


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


def _target_geometry(t: Geometry, layout: _Layout, n_layers: int, hidden_size: int | None,
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


def _layer_prefix(layout: _Layout, prefix: str) -> str:
    return f"{prefix}.{layout.layers}." if prefix else f"{layout.layers}."


def _axes(teacher: nn.Module, layout: _Layout, prefix: str, key: str, shape: torch.Size, hidden: int):
    """For a state-dict key: its layer index (None outside the layers) and what each dimension indexes."""
    m = re.match(re.escape(_layer_prefix(layout, prefix)) + r"(\d+)\.(.+)\.(weight|bias)$", key)
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
    if isinstance(owner, nn.Embedding) and name == "weight":
        return None, (None, "hidden")
    if isinstance(owner, nn.Linear) and name == "weight":  # LM head, pooler, classifier, MLM transform
        return None, tuple("hidden" if n == hidden else None for n in shape)
    if len(shape) == 1:  # norms and biases of the residual stream; other vectors (e.g. vocab biases) kept whole
        return None, ("hidden" if shape[0] == hidden else None,)
    if hidden in shape:
        raise DistilError(f"make_student does not know how to reduce {key} ({type(owner).__name__})")
    return None, (None,) * len(shape)


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


def _magnitude_scores(teacher, layout, prefix, layers, t: Geometry) -> dict[str, Any]:
    """Importance by weight norms: the squared norm of every inherited weight along each prunable axis."""
    scores = _empty_scores(t, len(layers))
    student_of = {i: j for j, i in enumerate(layers)}
    seen = set()
    for key, tensor in teacher.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(tensor.data_ptr())
        i, axes = _axes(teacher, layout, prefix, key, tensor.shape, t.hidden_size)
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


def _empty_scores(t: Geometry, n: int) -> dict[str, Any]:
    return {"hidden": torch.zeros(t.hidden_size),
            "heads": [torch.zeros(t.num_attention_heads) for _ in range(n)],
            "kv": [torch.zeros(t.num_key_value_heads) for _ in range(n)],
            "neurons": [torch.zeros(t.intermediate_size) for _ in range(n)]}


def _activation_scores(teacher, layout, prefix, layers, t: Geometry, calibration) -> dict[str, Any]:
    """Minitron's importance: mean |activation| over the calibration tokens (padding excluded) of each hidden
    channel (at the outputs of the residual-stream norms), MLP neuron (input of the down projection) and head
    (L2 norm of its output, input of the output projection)."""
    scores = _empty_scores(t, len(layers))
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


def _student_config(teacher, layout: _Layout, layers: list[int], g: Geometry):
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
    layout, prefix = _family(teacher)
    t = teacher_geometry(teacher)
    chosen = choose_layers(t.num_layers, layers, num_layers)
    g = _target_geometry(t, layout, len(chosen), hidden_size, intermediate_size, num_attention_heads,
                         num_key_value_heads)
    n = len(chosen)
    if (g.hidden_size, g.intermediate_size, g.num_attention_heads, g.num_key_value_heads) == (
            t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads):
        scores = _empty_scores(t, n)  # depth only: every channel is kept, no ranking needed
    elif calibration is not None:
        scores = _activation_scores(teacher, layout, prefix, chosen, t, calibration)
    else:
        scores = _magnitude_scores(teacher, layout, prefix, chosen, t)
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
    layout, prefix = _family(teacher)
    param = next(teacher.parameters())
    student = type(teacher)(plan.config).to(device=param.device, dtype=param.dtype)
    pattern = re.compile(re.escape(_layer_prefix(layout, prefix)) + r"(\d+)\.")
    t_state = teacher.state_dict()
    new_state = {}
    for key, target in student.state_dict().items():
        m = pattern.match(key)
        j = int(m.group(1)) if m else None
        t_key = pattern.sub(f"{_layer_prefix(layout, prefix)}{plan.layers[j]}.", key, count=1) if m else key
        if t_key not in t_state:
            raise DistilError(f"the student's {key} has no counterpart {t_key} in the teacher")
        tensor = t_state[t_key].detach()
        _, axes = _axes(teacher, layout, prefix, t_key, tensor.shape, teacher.config.hidden_size)
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
    plan = plan_student(teacher, layers=layers, num_layers=num_layers, hidden_size=hidden_size,
                        intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                        num_key_value_heads=num_key_value_heads, calibration=calibration)
    return build_student(teacher, plan)


def run_student_command(teacher: str, output: Path, **make_student_kwargs: Any) -> dict[str, Any]:
    """``distil student``: build a student from a teacher (local folder or built-in name), save it with the
    teacher's tokenizer to ``output`` (which must not exist or be empty; written atomically), print a table of
    parameters and size before and after, and return those numbers."""
    from rich.console import Console
    from rich.table import Table
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
        return {**hf.model_size(m), "disk_bytes": hf.folder_size(folder), **vars(teacher_geometry(m))}

    result = {"teacher": describe(model, teacher_path), "student": describe(student, output),
              "layers": choose_layers(model.config.num_hidden_layers, make_student_kwargs.get("layers"),
                                      make_student_kwargs.get("num_layers")), "output": str(output)}
    mib = lambda v: f"{v / 2**20:.1f} MiB"  # noqa: E731
    table = Table("", "teacher", "student", title=f"student of {teacher}")
    for label, cell in [("layers", lambda r: r["num_layers"]), ("hidden size", lambda r: r["hidden_size"]),
                        ("MLP width", lambda r: r["intermediate_size"]),
                        ("attention / KV heads", lambda r: f"{r['num_attention_heads']} / {r['num_key_value_heads']}"),
                        ("parameters", lambda r: f"{r['parameters']:,}"), ("size in memory", lambda r: mib(r["bytes"])),
                        ("size on disk", lambda r: mib(r["disk_bytes"]))]:
        table.add_row(label, str(cell(result["teacher"])), str(cell(result["student"])))
    ratio = result["student"]["parameters"] / result["teacher"]["parameters"]
    table.caption = (f"teacher layers kept: {result['layers']}; {ratio:.1%} of the teacher's parameters; "
                     f"saved to {output}")
    Console().print(table)
    return result
