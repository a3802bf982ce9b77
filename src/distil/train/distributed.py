"""Scale-out on torch.distributed: the process group, rank helpers, collectives that keep ranks in agreement, and
the placement of students (DDP or FSDP2) and frozen teachers (replicated, sharded, or sharded in CPU memory).

A run launched by `torchrun` (or `accelerate launch`) finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in its environment and joins the group they describe: NCCL on CUDA, gloo on CPU. In a plain process
every helper here is a no-op, so one code path serves both. Rank 0 writes every file (recipe, metrics, checkpoints,
model folders, summary); the others wait at the same point, and an error on rank 0 is raised on every rank, so no
rank is left waiting in a collective that will never come.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from distil.errors import DistilError

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_owned = False  # whether this module created the process group (and so destroys it)


# ----------------------------------------------------------------------------------------------- the process group
def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one rank of a job."""
    return all(key in os.environ for key in ENV)


def init_from_env(device: str = "auto") -> bool:
    """Join the job the environment describes (no-op in a plain process, or when a group exists already).

    `device` is the recipe's train.device: CUDA (and NCCL) when it allows CUDA and CUDA is present, else gloo."""
    global _owned
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local >= torch.cuda.device_count():
            raise DistilError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; launch at most "
                              "one process per device (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None)
    _owned = True
    return True


def shutdown() -> None:
    """Leave the process group if init_from_env created it, once every rank is done with it (a rank that leaves
    while another still talks to it can abort that one). After an error, call nothing: the launcher ends the job."""
    global _owned
    if _owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _owned = False


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 without a launcher), whether or not the group is still up."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def device_for(kind: str) -> torch.device:
    """The device of this rank: `cuda:LOCAL_RANK` under a launcher, else the plain `kind`."""
    return torch.device("cuda", local_rank()) if kind == "cuda" and active() else torch.device(kind)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


# ------------------------------------------------------------------------------------- collectives that agree
def agree(value: T) -> T:
    """Rank 0's `value` on every rank: decisions read from the file system (does this folder exist?) must not
    differ between ranks, or they would take different branches and wait forever in different collectives."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only (writes); the others wait and get its result. If it fails, every rank raises."""
    if not active():
        return fn(*args, **kwargs)
    result, failure, error = None, None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised below, after the other ranks heard of it
            error, failure = exc, f"{type(exc).__name__}: {exc}"
    box = [(result, failure)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, failure = box[0]
    if failure is not None:
        raise DistilError(f"rank 0 failed ({failure}); this rank stops too")
    return result  # type: ignore[return-value]


def sum_int(value: int) -> int:
    """The sum of `value` over all ranks."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(total)
    return int(total.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (e.g. a stop signal that reached one rank first)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_terms(terms: dict[str, float]) -> dict[str, float]:
    """Sum named values over ranks; a name missing on a rank counts 0 there (e.g. no CE on an on-policy batch)."""
    if not active():
        return terms
    gathered: list[dict[str, float] | None] = [None] * world_size()
    dist.all_gather_object(gathered, terms)
    total: dict[str, float] = {}
    for part in gathered:  # in rank order: every rank computes the same sums
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0.0) + value
    return total


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    if not active():
        return [value]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(value, out, dst=0)
    return out


# ------------------------------------------------------------------------------------------------- FSDP2 pieces
_MESH: Any = None


def mesh(device: torch.device) -> Any:
    """The 1-D device mesh over all ranks that FSDP shards along (one per process)."""
    global _MESH
    from torch.distributed.device_mesh import init_device_mesh

    if _MESH is None or _MESH.device_type != device.type:
        _MESH = init_device_mesh(device.type, (world_size(),))
    return _MESH


def mixed_precision(name: str) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if name == "bf16":  # gradients are reduced in fp32: a bf16 sum over many ranks would lose the small terms
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP gathers one at a time: Hugging Face's `_no_split_modules` (its decoder layers), else
    the items of the outermost ModuleLists. Small nets have none and stay one unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in names:
                found.append(child)  # not descended into: blocks do not nest
            elif not names and isinstance(child, nn.ModuleList):
                found.extend(item for item in child if any(True for _ in item.parameters()))
            else:
                visit(child)

    visit(model)
    return found


def lazy_init(root: nn.Module) -> None:
    """FSDP picks its root at the first forward; fix it now, so that a forward that bypasses the root (the fused
    LM-head path calls the decoder directly) or an evaluation before any training step finds everything set up."""
    state = root._get_fsdp_state()  # type: ignore[operator]
    state._lazy_init()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict, for saving: gathered to rank 0 on the CPU when FSDP sharded it (every rank must
    call; None on the others); else `module.state_dict()` as it is."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else None


# -------------------------------------------------------------------------------------------------- teachers
PLACEMENT_ATTR = "_distil_placement"


def wrap_teacher(model: nn.Module, placement: str, precision: str, device: torch.device) -> str:
    """Put a frozen teacher where the recipe says, once; returns a line saying where it is.

    replicate: a full copy on this rank's device. shard: FSDP2 across the ranks, each decoder block gathered only
    while it runs. cpu_offload: the same, with the shards kept in CPU memory between uses."""
    done = getattr(model, PLACEMENT_ATTR, None)
    if done is not None:
        return done
    if placement == "replicate" or not active():
        model.to(device)
        where = f"replicated on {device}" if active() else f"on {device}"
    else:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if placement == "cpu_offload" else OffloadPolicy()
        options = dict(mesh=mesh(device), mp_policy=mixed_precision(precision), offload_policy=offload)
        units = blocks(model)
        for block in units:
            fully_shard(block, reshard_after_forward=True, **options)
        fully_shard(model, **options)
        lazy_init(model)
        memory = "CPU memory" if placement == "cpu_offload" else str(device)
        gather = f"{len(units)} blocks gathered one at a time" if units else "gathered whole while it runs"
        where = f"sharded over {world_size()} processes in {memory} ({gather}, {precision})"
    setattr(model, PLACEMENT_ATTR, where)
    return where


def sharded_roots(models: list[nn.Module]) -> list[nn.Module]:
    return [m for m in models if is_sharded(m)]


@contextmanager
def gathered(roots: list[nn.Module]) -> Iterator[None]:
    """Hold the top-level parameters of FSDP roots (embeddings, final norm, LM head) gathered: code that reads them
    directly, not through the root's forward (a fused LM-head loss), then sees whole tensors."""
    for root in roots:
        root.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        for root in roots:
            root.reshard()  # type: ignore[operator]
