"""One training stage across processes: the loop calls these methods and never touches DDP or FSDP itself.

In one process every method is the plain single-process operation. Under a launcher:
- the objective's loss becomes the forward of a `_Step` module holding the trained modules (student, projectors), so
  DDP or FSDP2 wraps any objective, whatever it calls inside (the fused LM-head loss reads the LM-head weight
  directly: under FSDP that weight belongs to the `_Step` root's group, gathered for the whole forward);
- each rank draws its slice of every global batch; micro-batches are weighted by their share of the GLOBAL units
  (tokens or examples) and the loss is scaled by the world size, which DDP's and FSDP's gradient averaging divide
  out again: N processes with batch b take exactly the step of one process with batch N*b;
- logged terms are summed over ranks (each is already weighted by its share of the global units), so every rank
  sees the same numbers and makes the same decisions (skip a non-finite step, stop on a signal);
- checkpoints hold full state dicts in the single-process format (FSDP gathers them on rank 0) plus every rank's
  RNG state, and are written by rank 0 only;
- evaluation runs on rank 0 under DDP (the student is whole there) and on every rank under FSDP (each forward
  needs all of them); every rank gets rank 0's result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.data.stream import BatchStream
from distil.errors import DistilError
from distil.train import checkpoint as ckpt
from distil.train import distributed as dist
from distil.train.config import ParallelConfig

PREFIX = "trained."


class _Step(nn.Module):
    """The objective's loss as a module's forward: what DDP and FSDP wrap."""

    def __init__(self, objective: Any):
        super().__init__()
        self.trained = nn.ModuleDict(objective.modules)
        self.__dict__["objective"] = objective  # never a submodule: its frozen teachers stay outside the wrapped tree

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.objective.loss(batch)


class Parallel:
    def __init__(self, objective: Any, spec: ParallelConfig | None, device: torch.device):
        spec = spec or ParallelConfig()
        self.objective, self.spec, self.device = objective, spec, device
        self.world = dist.world_size()
        self.strategy = spec.strategy if dist.active() else None
        teachers = objective.teachers()
        self.placement = {name: dist.wrap_teacher(m, spec.teacher, spec.mixed_precision, device)
                          for name, m in teachers.items()}
        self.teacher_roots = dist.sharded_roots(list(teachers.values()))
        self.step_module: _Step | None = None
        self.root: nn.Module | None = None
        if self.strategy is not None:
            self.step_module = _Step(objective)
            self.root = self._wrap(self.step_module)
        self.params = [p for m in objective.modules.values() for p in m.parameters() if p.requires_grad]

    def _wrap(self, step: _Step) -> nn.Module:
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            if not any(p.requires_grad for p in step.parameters()):
                return step
            # device_ids=None: inputs stay where the objective puts them (sample ids read by a cache stay on CPU).
            return DistributedDataParallel(step, device_ids=None, find_unused_parameters=self.spec.find_unused_parameters)
        from torch.distributed.fsdp import fully_shard

        options = dict(mesh=dist.mesh(self.device), mp_policy=dist.mixed_precision(self.spec.mixed_precision))
        for module in self.objective.modules.values():
            for block in dist.blocks(module):
                fully_shard(block, **options)
        fully_shard(step, **options)  # the root group: all else (embeddings, final norm, LM head, small nets)
        dist.lazy_init(step)
        return step

    def describe(self) -> str:
        """Where each model runs, for the run log."""
        if self.strategy is None:
            student = f"one process on {self.device}"
        elif self.strategy == "ddp":
            student = f"DDP over {self.world} processes ({torch.distributed.get_backend()}, {self.device})"
        else:
            student = (f"FSDP2 over {self.world} processes ({torch.distributed.get_backend()}, {self.device}), "
                       f"{self.spec.mixed_precision} compute, fp32 gradient reduction")
        parts = [f"{', '.join(self.objective.modules)}: {student}"]
        parts += [f"{name}: frozen, {where}" for name, where in self.placement.items()]
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------------ a step
    def shard(self, stream: BatchStream) -> None:
        """This rank's slice of every global batch (the order stays a pure function of seed and epoch)."""
        if self.world == 1:
            return
        if stream.size < stream.batch_size * self.world:
            raise DistilError(f"{stream.size} training examples are fewer than one global batch ({self.world} "
                              f"processes x train.batch_size {stream.batch_size}); lower train.batch_size")
        stream.rank, stream.world_size = dist.rank(), self.world

    def global_units(self, units: int) -> int:
        return dist.sum_int(units)

    @property
    def loss_scale(self) -> int:
        """DDP and FSDP average gradients over ranks; the loss is pre-multiplied so the average is the global sum."""
        return self.world if self.strategy is not None else 1

    def accumulating(self, sync: bool) -> Any:
        """Around the forward and backward of a micro-batch: DDP skips its all-reduce until the last one.

        (FSDP reduce-scatters every micro-batch, keeping only sharded gradients: memory first.)"""
        if self.strategy == "ddp" and not sync and hasattr(self.root, "no_sync"):
            return self.root.no_sync()  # type: ignore[union-attr]
        return nullcontext()

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        with dist.gathered(self.teacher_roots):  # frozen: nothing of theirs is needed in backward
            return self.root(batch) if self.root is not None else self.objective.loss(batch)

    def clip(self, max_norm: float | None) -> torch.Tensor:
        """Clip the gradient norm over all parameters (sharded ones included); returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm or float("inf"))
        full = getattr(norm, "full_tensor", None)
        return full() if full is not None else norm

    def reduce(self, logged: dict[str, float]) -> dict[str, float]:
        return dist.sum_terms(logged)

    def stopping(self, requested: bool) -> bool:
        return dist.any_rank(requested)

    def seed_ranks(self) -> None:
        """A fresh stage: ranks > 0 move to RNG streams of their own (dropout, sampling), derived from the seed."""
        if dist.rank() > 0:
            from distil.train.seed import seed_everything

            seed_everything(torch.initial_seed() + 1_000_003 * dist.rank())

    def evaluate(self, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        if self.strategy is None:
            return fn()
        if self.strategy == "ddp":
            return dist.on_main(fn)
        # Parameters are gathered in the compute dtype; outside the step's forward nothing casts the inputs to it.
        bf16 = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec.mixed_precision == "bf16")
        with self.student_gathered(), bf16:
            return dist.agree(fn())

    @contextmanager
    def student_gathered(self) -> Iterator[None]:
        """Under FSDP, the trained modules usable outside the step (blocks gather themselves when called)."""
        with dist.gathered([self.step_module] if self.strategy == "fsdp" else []):  # type: ignore[list-item]
            yield

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, folder: Path, step: int, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int) -> Path:
        modules = self.objective.modules
        if self.strategy is None:
            return ckpt.save_checkpoint(folder, step, modules=modules, optimizer=optimizer, state=state, keep=keep)
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
            full = get_model_state_dict(self.step_module, options=options)
            weights = {k[len(PREFIX) :]: v for k, v in full.items()}
            opt_state = get_optimizer_state_dict(self.step_module, optimizer, options=options)
            opt_state = self._by_index(opt_state) if dist.is_main() else None
        else:  # DDP: every rank holds the same weights and optimizer state
            weights = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
            opt_state = optimizer.state_dict() if dist.is_main() else None
        rngs = dist.gather_to_main(ckpt.rng_state())
        return dist.on_main(ckpt.write_checkpoint, folder, step, weights=weights, optimizer=opt_state, state=state,
                            keep=keep, rank_rng=rngs)

    def latest(self, folder: Path) -> ckpt.Checkpoint | None:
        """The newest intact checkpoint, chosen by rank 0 (which alone warns about damaged ones), loaded by all."""
        path = dist.on_main(ckpt.latest_intact, folder) if self.strategy is not None else ckpt.latest_intact(folder)
        return None if path is None else ckpt.load_checkpoint(path)

    def load(self, resumed: ckpt.Checkpoint, optimizer: torch.optim.Optimizer) -> None:
        """Weights and optimizer state from a checkpoint (written by any number of processes, any strategy)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.step_module, {PREFIX + k: v for k, v in resumed.modules.items()},
                                 options=options)
            if resumed.optimizer is not None:
                set_optimizer_state_dict(self.step_module, optimizer, self._by_name(resumed.optimizer),
                                         options=options)
        else:
            for name, module in self.objective.modules.items():
                module.load_state_dict(resumed.module_state(name))
            if resumed.optimizer is not None:
                optimizer.load_state_dict(resumed.optimizer)

    def rng_of(self, resumed: ckpt.Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's saved RNG state. A checkpoint of fewer processes gives the missing ranks a saved rank's."""
        return resumed.rank_rng(dist.rank() % resumed.world_size)

    # FSDP's full optimizer state dict names parameters; distil's checkpoints number them in optimizer order, as a
    # single process does, so a checkpoint resumes under any strategy and any number of processes.
    def _names(self) -> list[str]:
        names = {id(p): n for n, p in self.step_module.named_parameters()}  # type: ignore[union-attr]
        return [names[id(p)] for p in self.params]

    def _by_index(self, state: dict[str, Any]) -> dict[str, Any]:
        index = {name: i for i, name in enumerate(self._names())}
        return {"state": {index[k]: v for k, v in state["state"].items()},
                "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]}

    def _by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        names = self._names()
        return {"state": {names[int(i)]: v for i, v in state["state"].items()},
                "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]]}
