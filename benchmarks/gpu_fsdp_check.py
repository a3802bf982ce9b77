"""FSDP2 check of distil's distributed training on CUDA with NCCL (CI stays CPU-only; this needs a GPU).

Run through benchmarks/gpu_fsdp_check.sh, which launches it under torchrun with one process per GPU (one GPU: a
1-process NCCL group; FSDP2 then "shards" over one rank, which still runs every code path: DTensor parameters,
all-gather in bf16, fp32 reduce-scatter, gathered full state dicts). With DEVICE=cpu it runs on gloo instead (how it
was dry-run on the CPU machine).

Checks, on a random Llama teacher (8 layers, hidden 512, vocabulary 8192, tied head) and a 4-layer student built from
it, with distil's own loop and the fused LM-head loss:
  fsdp_bf16        student FSDP2 + teacher sharded, MixedPrecisionPolicy bf16/fp32: 6 steps, finite losses
  resume           the same run crashed at step 5 (checkpoint at 3) and resumed: final weights vs uninterrupted
  checkpoint       the final checkpoint (gathered on rank 0) equals the gathered final weights, and loads into a plain
                   single-process Hugging Face model whose logits match the trained student's
  ddp_cpu_offload  student DDP with bf16 autocast + teacher sharded in CPU memory (CPUOffloadPolicy, pinned)
Each prints one line; rank 0 writes OUT/gpu_fsdp_check.json with versions, devices, timings and peak memory.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from distil.config.schema import DistributedSpec, LossSpec, TrainSpec
from distil.data.stream import BatchStream
from distil.distill.lm import CausalLMObjective
from distil.distill.pair import Teacher
from distil.train import checkpoint as ckpt
from distil.train import distributed as dist
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog

KIND = os.environ.get("DEVICE", "cuda")
STEPS, BATCH, SEQ, VOCAB = 6, 8, 128, 8192


class Boom(Exception):
    pass


class Crashing(CausalLMObjective):
    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at = 0, crash_at

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Boom
        return super().loss(batch)


def models(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distil.students import make_student

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
                         tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config)
    student = make_student(teacher, num_layers=4).train().to(device)
    student.config.use_cache = False
    return teacher.eval(), student


def stage(folder: Path, device: torch.device, spec: DistributedSpec, *, precision: str = "fp32",
          crash_at: int | None = None):
    teacher, student = models(device)
    if spec.teacher == "replicate":
        teacher.to(device)
    blocks = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(1))
    collate = lambda i: {"input_ids": blocks[i], "attention_mask": torch.ones_like(blocks[i]),  # noqa: E731
                         "labels": blocks[i]}
    train_spec = TrainSpec(steps=STEPS, batch_size=BATCH // dist.world_size(), lr=1e-3, log_every=1, save_every=3,
                           precision=precision)
    loss = LossSpec(alpha=0.5, temperature=2.0, fused=True)
    kwargs = dict(vocab_size=VOCAB, device=device)
    objective = (Crashing(student, Teacher(teacher), loss, crash_at=crash_at, **kwargs) if crash_at
                 else CausalLMObjective(student, Teacher(teacher), loss, **kwargs))
    stream = BatchStream(len(blocks), train_spec.batch_size, collate, seed=0)
    return Stage("check", objective, stream, train_spec, folder / "ckpt", MetricsLog(folder / "metrics.jsonl",
                 tensorboard=False), device, distributed=spec), student


def run_stage(folder: Path, device: torch.device, spec: DistributedSpec, **kwargs):
    s, student = stage(folder, device, spec, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train(s, show_progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    losses = [r["loss"] for r in MetricsLog(folder / "metrics.jsonl", tensorboard=False).read() if "loss" in r]
    return student, {"seconds": round(seconds, 3), "peak_mib": peak, "losses": losses}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
    dist.init_from_env(KIND)
    device = dist.device_for(KIND)
    report: dict = {"torch": torch.__version__, "backend": torch.distributed.get_backend(), "world": dist.world_size(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "checks": {}}
    work = out / "work"

    def check(name: str, fn) -> None:
        try:
            ok, details = fn()
        except Exception as exc:  # every check runs and is reported, whatever the others did
            ok, details = False, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        report["checks"][name] = {"pass": ok, **details}
        if dist.is_main():
            print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps({k: v for k, v in details.items() if k != 'trace'})}",
                  flush=True)

    fsdp = DistributedSpec(strategy="fsdp", teacher="shard", mixed_precision="bf16")
    final: dict = {}

    def fsdp_bf16():
        student, info = run_stage(work / "straight", device, fsdp)
        final["straight"] = dist.full_state_dict(student)
        final["student"] = student
        finite = all(l == l and abs(l) != float("inf") for l in info["losses"])
        return finite, {"loss_fell": info["losses"][-1] < info["losses"][0], **info}

    def resume():
        s, _ = stage(work / "resumed", device, fsdp, crash_at=5)
        try:
            train(s, show_progress=False)
            return False, {"error": "the crash did not happen"}
        except Boom:
            pass
        student, info = run_stage(work / "resumed", device, fsdp)
        weights = dist.full_state_dict(student)
        if not dist.is_main():
            return True, {}
        diff = max(float((weights[k].float() - final["straight"][k].float()).abs().max()) for k in weights)
        bitwise = all(torch.equal(weights[k], final["straight"][k]) for k in weights)
        return diff < 1e-3, {"bitwise": bitwise, "max_abs_diff": diff, **info}

    def checkpoint():
        from transformers import LlamaForCausalLM

        if not dist.is_main():
            dist.barrier()
            return True, {}
        latest = ckpt.load_checkpoint(ckpt.list_checkpoints(work / "straight" / "ckpt")[-1])
        saved = latest.module_state("student")
        equal = all(torch.equal(saved[k], final["straight"][k]) for k in final["straight"])
        plain = LlamaForCausalLM(final["student"].config).to(device)
        plain.load_state_dict(saved)
        ids = torch.randint(0, VOCAB, (2, SEQ), device=device)
        with torch.no_grad():
            logits = plain(input_ids=ids).logits.float()
        dist.barrier()
        return equal and bool(torch.isfinite(logits).all()), {"checkpoint_equals_gathered": equal,
                                                              "files": sorted(p.name for p in latest.path.iterdir())}

    def ddp_cpu_offload():
        spec = DistributedSpec(strategy="ddp", teacher="cpu_offload", mixed_precision="bf16")
        _, info = run_stage(work / "offload", device, spec, precision="bf16")
        return all(l == l for l in info["losses"]), info

    for name, fn in [("fsdp_bf16", fsdp_bf16), ("resume", resume), ("checkpoint", checkpoint),
                     ("ddp_cpu_offload", ddp_cpu_offload)]:
        check(name, fn)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_fsdp_check.json").write_text(json.dumps(report, indent=1))
        print("all passed" if all(c["pass"] for c in report["checks"].values()) else "SOME CHECKS FAILED", flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
