"""Atomic, pickle-free checkpoints.

A checkpoint is a folder `step-00000100/` holding safetensors (weights, optimizer tensors, RNG state) and JSON
(everything else), written under a temporary name, fsynced, renamed into place, and sealed by a `COMPLETE` file
written last with the sha256 of every file. A folder without a valid seal is never loaded: the loader warns, naming
the damaged file, and falls back to the previous checkpoint. `state.json` also records the library versions and
(when the stage carries it) the resolved recipe, so a resume can say what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distil.diskspace import check_space, disk_full_guard, tensor_bytes
from distil.errors import DistilError

SEAL = "COMPLETE"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors writes straight from each tensor's memory but refuses tensors that share storage (tied weights):
    # only those are cloned, so a checkpoint of a large model does not need a second copy of it in memory.
    plain, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in storages or storage == 0:
            value = value.clone()
        storages.add(storage)
        plain[key] = value
    save_file(plain, str(path), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a damaged file) is refused with a DistilError.

    distil never unpickles: a pickle can run arbitrary code while it loads."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80" or head == b"PK":  # a pickle protocol header, or torch.save's zip of pickles
            raise DistilError(f"{path} is a pickle (or torch.save) file, not safetensors; distil never loads pickles "
                              "because unpickling can run code; convert it with safetensors.torch.save_file")
        return load_file(path)
    except SafetensorError as exc:
        raise DistilError(f"{path} is not a valid safetensors file ({exc}); replace it or delete it") from None


# ----------------------------------------------------------------------------------------------- state flattening
def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    rest = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = rest["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------- save and load
@dataclass
class Checkpoint:
    path: Path
    step: int
    modules: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng_tensors: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.modules.items() if k.startswith(prefix)}

    @property
    def world_size(self) -> int:
        """How many processes wrote this checkpoint (each saved its own RNG state)."""
        return int(self.state.get("world_size", 1))

    def rank_rng(self, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The RNG state rank `rank` saved (rank 0's is the one a single process saves)."""
        if rank == 0:
            return self.rng_tensors, self.state["rng"]
        return load_tensors(self.path / f"rng-rank{rank}.safetensors"), self.state["rng_ranks"][str(rank)]


def save_checkpoint(
    folder: Path,
    step: int,
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `folder/step-<step>/` atomically and keep only the newest `keep` checkpoints."""
    weights = {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}
    return write_checkpoint(folder, step, weights=weights, optimizer=optimizer, state=state, keep=keep)


def write_checkpoint(
    folder: Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    keep: int = 2,
    rank_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> Path:
    """`save_checkpoint` from gathered pieces: weights named `<module>.<key>`, an optimizer or its (index-keyed)
    state dict, and, with several processes, every rank's RNG state (rank r > 0 in `rng-rank<r>.safetensors`)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    for stale in folder.glob(f".{PREFIX}*.tmp-*"):  # left by a process killed while writing; never loaded
        shutil.rmtree(stale, ignore_errors=True)
    # Everything to write is gathered first, so its size is known and a disk too small refuses before writing.
    state = dict(state, step=step)
    state.setdefault("versions", _versions())
    files = {"modules.safetensors": weights}
    if optimizer is not None:
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        files["optimizer.safetensors"], state["optimizer"] = flatten_optimizer(opt_state)
    rng_tensors, state["rng"] = rank_rng[0] if rank_rng else rng_state()
    files["rng.safetensors"] = rng_tensors
    if rank_rng and len(rank_rng) > 1:
        state["world_size"] = len(rank_rng)
        state["rng_ranks"] = {}
        for r, (tensors, rest) in enumerate(rank_rng[1:], start=1):
            files[f"rng-rank{r}.safetensors"] = tensors
            state["rng_ranks"][str(r)] = rest
    needed = (tensor_bytes((t for f in files.values() for t in f.values()), files=len(files) + 2, shared_once=False)
              + len(json.dumps(state, indent=1)) + 100 * len(files))  # + state.json and the seal's lines
    check_space(final, needed)
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    with disk_full_guard(final, needed, cleanup=tmp):  # a failed write leaves neither the folder nor its space used
        tmp.mkdir()
        for name, tensors in files.items():
            save_tensors(tmp / name, tensors)
        write_json(tmp / "state.json", state)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        write_json(tmp / SEAL, {"files": {name: _sha256(tmp / name) for name in names}})
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resuming at a checkpoint boundary)
            shutil.rmtree(final)
        os.replace(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders (sealed or not), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else a description of the first problem found."""
    seal = path / SEAL
    if not seal.is_file():
        return f"{seal} is missing (the checkpoint was not finished)"
    try:
        expected = json.loads(seal.read_text())["files"]
    except (ValueError, KeyError):
        return f"{seal} is damaged"
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != digest:
            return f"{file} is damaged (checksum mismatch)"
    return None


def load_latest(folder: Path) -> Checkpoint | None:
    """The newest intact checkpoint in `folder`, warning about (and skipping) damaged newer ones."""
    path = latest_intact(folder)
    return None if path is None else load_checkpoint(path)


def latest_intact(folder: Path) -> Path | None:
    """The newest checkpoint folder whose seal verifies, warning about (and skipping) damaged newer ones."""
    for path in reversed(list_checkpoints(folder)):
        problem = verify(path)
        if problem:
            warnings.warn(f"skipping checkpoint {path.name}: {problem}; using the previous one", stacklevel=3)
            continue
        return path
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    state = json.loads((path / "state.json").read_text())
    optimizer = None
    if (path / "optimizer.safetensors").exists() and "optimizer" in state:
        optimizer = unflatten_optimizer(load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        modules=load_tensors(path / "modules.safetensors"),
        optimizer=optimizer,
        rng_tensors=load_tensors(path / "rng.safetensors"),
        state=state,
    )


_VERSIONS: dict[str, str] = {}


def _versions() -> dict[str, str]:
    if not _VERSIONS:
        from distil.paths import library_versions

        _VERSIONS.update(library_versions())
    return dict(_VERSIONS)


def resume_warnings(checkpoint: Checkpoint, recipe: dict[str, Any] | None) -> list[str]:
    """What differs between the run that wrote `checkpoint` and this one: exact resume needs neither to differ."""
    from distil.paths import release_mismatch

    found = []
    saved = checkpoint.state.get("versions", {})
    changed = [f"{k} {saved[k]} -> {v}" for k, v in _versions().items() if k in saved and saved[k] != v]
    release = release_mismatch(saved)
    if release:  # another release line: the state loads (safetensors + JSON), but the arithmetic may differ
        found.append(f"{checkpoint.path} was written with {release}; resuming from it, but the run will not match "
                     f"an uninterrupted one bit for bit (to redo the stage on this machine, delete {checkpoint.path.parent})")
    elif changed:
        found.append(f"{checkpoint.path} was written with other library versions ({', '.join(changed)}); "
                     "the resumed run may not match an uninterrupted one bit for bit")
    before = checkpoint.state.get("recipe")
    if recipe is not None and before is not None and before != recipe:
        keys = sorted(k for k in set(before) | set(recipe) if before.get(k) != recipe.get(k))
        found.append(f"{checkpoint.path} was written by a different recipe (changed: {', '.join(keys)}); "
                     "continuing with the current one")
    return found
