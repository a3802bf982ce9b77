"""Training scenarios run under `torchrun` by tests/train/test_distributed.py, and in one process by the same tests
for the reference. Usage: torchrun --standalone --nproc_per_node 2 distributed_worker.py OUT TINY_LM SCENARIO...

Each scenario trains a real (tiny) model through distil's loop and writes, from rank 0, the final weights to
OUT/<scenario>.safetensors and the metrics to OUT/<scenario>/metrics.jsonl; resume scenarios also write every
rank's final RNG state (OUT/<scenario>-rng-rank<r>.safetensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from distil.config.schema import DistributedSpec, LossSpec, TrainSpec
from distil.data.stream import BatchStream
from distil.distill.lm import CausalLMObjective
from distil.distill.objectives import ClassifierObjective
from distil.distill.pair import Teacher
from distil.train import distributed as dist
from distil.train.checkpoint import save_tensors
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog

CPU = torch.device("cpu")
GLOBAL_BATCH = 8  # per step, over all processes


class Boom(Exception):
    pass


class Crashing(ClassifierObjective):
    """Raises at the n-th loss call, on every rank at the same micro-batch: a crash in the middle of a run."""

    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at = 0, crash_at

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Boom
        return super().loss(batch)


# ------------------------------------------------------------------------------------------------- classifier
def classifier_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g)


def classifier_pair(dropout: float = 0.0):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 5))
    return student, teacher


def classifier_stage(folder: Path, strategy: str, *, world: int, precision: str = "fp32", teacher: str = "shard",
                     steps: int = 6, crash_at: int | None = None, dropout: float = 0.0, student=None):
    x, y = classifier_data()
    model, teacher_model = classifier_pair(dropout)
    model = student or model
    spec = TrainSpec(steps=steps, batch_size=GLOBAL_BATCH // (2 * world), grad_accum=2, lr=0.02, log_every=1,
                     save_every=2, warmup_steps=1, eval_every=3, precision="fp32")  # bf16: FSDP's mixed_precision
    loss = LossSpec(alpha=0.7, temperature=3.0)
    args = (model, Teacher(teacher_model), loss, CPU)
    objective = Crashing(*args, crash_at=crash_at) if crash_at else ClassifierObjective(*args)
    stream = BatchStream(len(y), spec.batch_size, lambda i: (x[i], y[i]), seed=3)

    def evaluate():
        with torch.no_grad():
            return {"accuracy": float((model(x).argmax(-1) == y).float().mean())}

    stage = Stage("arm", objective, stream, spec, folder / "ckpt", MetricsLog(folder / "metrics.jsonl",
                  tensorboard=False), CPU, evaluate=evaluate,
                  distributed=DistributedSpec(strategy=strategy, teacher=teacher, mixed_precision=precision))
    return stage, model


# ------------------------------------------------------------------------------------------------ causal LM
def lm_stage(folder: Path, tiny_lm: Path, strategy: str, *, world: int, teacher: str = "shard"):
    from transformers import AutoModelForCausalLM

    from distil.data.sources.text import lm_batch
    from distil.students import make_student

    torch.manual_seed(0)
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    student = make_student(teacher_model, num_layers=2).train()
    student.config.use_cache = False
    blocks = torch.randint(0, teacher_model.config.vocab_size, (32, 24), generator=torch.Generator().manual_seed(5))

    def collate(indices):
        batch = lm_batch(blocks[indices])
        for row, i in enumerate(indices.tolist()):  # ranks get different numbers of counted tokens
            batch["labels"][row, : 3 * (i % 5)] = -100
        return batch

    spec = TrainSpec(steps=4, batch_size=GLOBAL_BATCH // world, lr=3e-3, log_every=1, save_every=2,
                     precision="fp32")  # the parity tolerances are fp32 ones, on every CPU kind
    loss = LossSpec(alpha=0.5, temperature=2.0, fused=True, chunk_size=16)
    objective = CausalLMObjective(student, Teacher(teacher_model), loss, vocab_size=teacher_model.config.vocab_size,
                                  device=CPU)
    stream = BatchStream(len(blocks), spec.batch_size, collate, seed=7)
    stage = Stage("arm", objective, stream, spec, folder / "ckpt", MetricsLog(folder / "metrics.jsonl",
                  tensorboard=False), CPU, distributed=DistributedSpec(strategy=strategy, teacher=teacher))
    return stage, student


# ------------------------------------------------------------------------------------------------ scenarios
def run(name: str, out: Path, tiny_lm: Path | None, world: int) -> None:
    """Train scenario `name` and write its results under `out` (see the module doc)."""
    folder = out / name
    kind, strategy, *rest = name.split("-")
    if kind == "lm":
        stage, model = lm_stage(folder, tiny_lm, strategy, world=world, teacher=rest[0] if rest else "shard")
        train(stage, show_progress=False)
    elif kind == "resume":  # crash at the 7th micro-batch (step 4; last checkpoint at step 2), resume, compare
        stage, model = classifier_stage(folder, strategy, world=world, crash_at=7, dropout=0.3, steps=6)
        try:
            train(stage, show_progress=False)
            raise AssertionError("the crash did not happen")
        except Boom:
            pass
        torch.manual_seed(1234 + dist.rank())  # a resumed process starts from other RNG state and other weights
        fresh = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))
        stage, model = classifier_stage(folder, strategy, world=world, dropout=0.3, steps=6, student=fresh)
        train(stage, show_progress=False)
    elif kind == "straight":  # the uninterrupted run the resumed one must equal
        stage, model = classifier_stage(folder, strategy, world=world, dropout=0.3, steps=6)
        train(stage, show_progress=False)
    else:
        precision = rest[0] if rest else "fp32"
        teacher = "replicate" if strategy == "ddp" else "shard"
        stage, model = classifier_stage(folder, strategy, world=world, precision=precision, teacher=teacher)
        train(stage, show_progress=False)
    # What this rank holds of the student and the teacher (FSDP: its shards), before gathering for the save.
    teacher = getattr(stage.objective.teacher, "model", None)
    held = {"student": _local_numel(model), "student_full": sum(p.numel() for p in model.parameters()),
            "teacher": _local_numel(teacher), "teacher_full": sum(p.numel() for p in teacher.parameters())}
    weights = dist.full_state_dict(model)
    if kind in ("resume", "straight"):
        save_tensors(out / f"{name}-rng-rank{dist.rank()}.safetensors", {"torch": torch.get_rng_state()})
    if dist.is_main():
        save_tensors(out / f"{name}.safetensors", weights)
        (out / f"{name}.json").write_text(json.dumps({"world": world, "rank0_holds": held}))
    dist.barrier()


def _local_numel(model: nn.Module) -> int:
    return sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())


def main() -> None:
    out, tiny_lm, *names = sys.argv[1:]
    dist.init_from_env("cpu")
    torch.set_num_threads(1)
    for name in names:
        run(name, Path(out), Path(tiny_lm) if tiny_lm != "-" else None, dist.world_size())
    dist.shutdown()


if __name__ == "__main__":
    main()
