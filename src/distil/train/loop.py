"""The training loop: one function, read top to bottom.

It knows nothing about teachers or losses: an `Objective` turns a batch into named loss terms. The loop does
accumulation, clipping, the optimizer and schedule, mixed precision, logging, evaluation, checkpoints, exact resume,
graceful stop and the non-finite guard. Under torchrun it trains across processes (DDP or FSDP2) through a
`Parallel` (distil.train.parallel), whose methods are the plain single-process operations in one process.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distil.data.stream import BatchStream
from distil.errors import DistilError
from distil.precision import train_precision
from distil.train import checkpoint as ckpt
from distil.train import distributed as dist
from distil.train.config import ParallelConfig, TrainConfig
from distil.train.metrics import MetricsLog
from distil.train.objective import Objective
from distil.train.optim import build_optimizer, build_scheduler
from distil.train.parallel import Parallel
from distil.train.signals import StopRequested, stop_signals


@dataclass
class Stage:
    """One training run of one model (an arm of a recipe, or the teacher stage)."""

    name: str
    objective: Objective
    stream: BatchStream
    spec: TrainConfig
    checkpoint_dir: Path
    metrics: MetricsLog
    device: torch.device
    evaluate: Callable[[], dict[str, float]] | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None  # JSON-able state saved with each checkpoint
    recipe: dict[str, Any] | None = None  # the resolved recipe, recorded in each checkpoint
    elapsed_s: float = 0.0  # set by train(): seconds spent training, summed over the runs that resumed it
    distributed: ParallelConfig | None = None  # None: the recipe's `distributed` section, else the defaults


def train(stage: Stage, *, show_progress: bool = True) -> dict[str, float]:
    """Train `stage` to `spec.steps`, resuming from its newest intact checkpoint if one exists."""
    spec, objective, stream = stage.spec, stage.objective, stage.stream
    if not any(p.requires_grad for m in objective.modules.values() for p in m.parameters()):
        raise DistilError(f"stage '{stage.name}': nothing to train (no parameter requires grad)")
    par = Parallel(objective, stage.distributed or _distributed_spec(stage.recipe), stage.device)
    par.shard(stream)  # this rank's slice of every global batch
    params = par.params
    optimizer = build_optimizer(spec, params)
    scheduler = build_scheduler(spec, optimizer)
    step, last_saved, elapsed_before = 0, None, 0.0
    if par.strategy is not None and dist.is_main():
        _say(f"[bold]{stage.name}[/bold]: {par.describe()}")

    resumed = par.latest(stage.checkpoint_dir)
    if resumed is not None:
        for message in ckpt.resume_warnings(resumed, stage.recipe) if dist.is_main() else []:
            warnings.warn(message, stacklevel=2)
        if resumed.world_size != par.world and dist.is_main():
            warnings.warn(f"{resumed.path} was written by {resumed.world_size} processes and this run has {par.world}: "
                          "the data continues from the same position, but the run will not match an uninterrupted "
                          "one bit for bit", stacklevel=2)
        par.load(resumed, optimizer)
        scheduler.load_state_dict(resumed.state["scheduler"])
        stream.load_state_dict(resumed.state["stream"])
        ckpt.set_rng_state(*par.rng_of(resumed))  # each rank its own
        step, last_saved = resumed.step, resumed.path
        elapsed_before = float(resumed.state.get("elapsed_s", 0.0))
        del resumed  # its weights now live in the modules: do not hold a second copy while training
    else:
        par.seed_ranks()
    # Records past the checkpoint (all of the stage's, when there is none) come from a run that died before saving
    # again: this run writes them again, exactly as they were.
    stage.metrics.truncate(stage.name, step)
    started = time.perf_counter()

    def save() -> Path:
        stage.elapsed_s = elapsed_before + time.perf_counter() - started
        state = {"scheduler": scheduler.state_dict(), "stream": stream.state_dict(), "stage": stage.name,
                 "elapsed_s": stage.elapsed_s}
        if stage.extra_state is not None:
            state["extra"] = stage.extra_state()
        if stage.recipe is not None:
            state["recipe"] = stage.recipe
        return par.save(stage.checkpoint_dir, step, optimizer, state, spec.keep_checkpoints)

    bf16 = train_precision(spec.precision, stage.device.type) == "bf16"
    autocast = torch.autocast(stage.device.type, dtype=torch.bfloat16, enabled=bf16)
    for module in objective.modules.values():
        module.train()
    window_units, window_start, skipped_in_a_row = 0, time.perf_counter(), 0
    evaluation: dict[str, float] = {}
    show_progress = show_progress and dist.is_main()  # one bar, on rank 0
    with stop_signals() as stop, _progress(stage.name, spec.steps, step, show_progress) as advance:
        if stop.requested and step < spec.steps:  # asked to stop before this stage began (e.g. between stages)
            raise StopRequested(stage.name, step, last_saved)
        while step < spec.steps:
            # Fetch all micro-batches first so each can be weighted by its share of the step's units (tokens or
            # examples): 4 x 2 accumulation then equals one batch of 8 exactly, whatever the padding.
            # prepare: e.g. on-policy sampling (decided once for the whole step), before the batches are weighed
            micro_batches = objective.prepare([stream.next() for _ in range(spec.grad_accum)], step)
            weights = [objective.weight(b) for b in micro_batches]
            total_units = par.global_units(sum(weights))  # over all ranks: N ranks x batch b == 1 x batch N*b
            if total_units == 0:
                raise DistilError(f"stage '{stage.name}': step {step + 1} has no positions that count (every label "
                                  "is masked); check the data, e.g. prompts longer than data.seq_len")
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}  # on the device: reading a term is a sync, done once per step below
            for i, (batch, units) in enumerate(zip(micro_batches, weights)):
                share = units / total_units if total_units else 0.0
                with par.accumulating(sync=i == len(micro_batches) - 1):
                    with autocast:
                        terms = par.loss(batch)
                    (terms["loss"] * (share * par.loss_scale)).backward()
                for key, value in terms.items():
                    weighted = value.detach().double() * share  # float64: the same arithmetic as Python floats
                    sums[key] = weighted if key not in sums else sums[key] + weighted
            logged = _read_terms(sums)
            logged = par.reduce(logged)  # summed over ranks: every rank decides the same below
            grad_norm = par.clip(spec.clip_grad_norm)
            bad = [k for k, v in logged.items() if not _finite(v)] or ([] if _finite(float(grad_norm)) else ["grad_norm"])
            if bad:
                skipped_in_a_row += 1
                if skipped_in_a_row > spec.max_nonfinite_skips:
                    where = f"last good checkpoint: {last_saved}" if last_saved else "no checkpoint was written yet"
                    term = next((k for k in bad if k != "loss"), bad[0])  # name the term, not only the total
                    what = {"grad_norm": "gradient norm", "loss": "loss"}.get(term, f"loss term '{term}'")
                    raise DistilError(
                        f"stage '{stage.name}': non-finite {what} ({logged.get(term, float(grad_norm))}) at step "
                        f"{step + 1}; {where}. Lower train.lr, enable train.clip_grad_norm, or set "
                        "train.max_nonfinite_skips=N to skip such steps"
                    )
                optimizer.zero_grad(set_to_none=True)
                stage.metrics.write({"arm": stage.name, "step": step + 1, "skipped_nonfinite": bad[0]})
                continue
            skipped_in_a_row = 0
            optimizer.step()
            scheduler.step()
            step += 1
            window_units += total_units
            advance(logged["loss"])

            if step % spec.log_every == 0 or step == spec.steps:
                elapsed = time.perf_counter() - window_start
                record = {"arm": stage.name, "step": step, **{_term_key(k): v for k, v in logged.items()}}
                record.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
                record[f"{objective.unit}_per_s"] = window_units / elapsed if elapsed > 0 else 0.0
                stage.metrics.write(record)
                window_units, window_start = 0, time.perf_counter()
            # The final evaluation comes before the final checkpoint, like every other record: a run killed after
            # that checkpoint never writes it twice.
            if stage.evaluate is not None and (step == spec.steps or (spec.eval_every and step % spec.eval_every == 0)):
                evaluation = _evaluate(stage, step, par)
            stopping = par.stopping(stop.requested)  # any rank's signal stops all of them after the same step
            if (spec.save_every and step % spec.save_every == 0) or step == spec.steps:
                last_saved = save()
            elif stopping:
                last_saved = save()
            if stopping and step < spec.steps:
                raise StopRequested(stage.name, step, last_saved)
    if stage.evaluate is not None and not evaluation:  # resumed from the final checkpoint: already logged
        evaluation = _evaluate(stage, step, par, log=False)
    stage.elapsed_s = elapsed_before + time.perf_counter() - started
    return evaluation


def _evaluate(stage: Stage, step: int, par: Parallel, *, log: bool = True) -> dict[str, float]:
    modes = {name: m.training for name, m in stage.objective.modules.items()}
    for m in stage.objective.modules.values():
        m.eval()
    # Evaluation must not shift the training RNG stream: a run with evaluations resumes like one without.
    rng = torch.get_rng_state()
    try:
        result = par.evaluate(stage.evaluate)  # type: ignore[arg-type]
    finally:
        torch.set_rng_state(rng)
        for name, m in stage.objective.modules.items():
            m.train(modes[name])
    if log:
        stage.metrics.write({"arm": stage.name, "step": step, **{f"eval/{k}": v for k, v in result.items()}})
    return result


def _read_terms(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every loss term of the step in one device-to-host transfer (one stacked tensor)."""
    if not sums:
        return {}
    values = torch.stack([t.reshape(()) for t in sums.values()]).tolist()
    return dict(zip(sums, values))


def _distributed_spec(recipe: dict[str, Any] | None) -> ParallelConfig | None:
    section = (recipe or {}).get("distributed")
    return ParallelConfig(**section) if section else None


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message, soft_wrap=True)


def _term_key(name: str) -> str:
    return "loss" if name == "loss" else f"loss/{name}"


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


class _progress:
    """A rich progress bar with ETA and the running loss; silent when disabled."""

    def __init__(self, name: str, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.bar = Progress(
            TextColumn(f"[bold]{name}[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False, disable=not enabled,
        )
        self.task = self.bar.add_task(name, total=total, completed=done, loss="-")

    def __enter__(self) -> Callable[[float], None]:
        self.bar.__enter__()
        return lambda loss: self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
