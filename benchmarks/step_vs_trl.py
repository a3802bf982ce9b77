"""One whole off-policy distillation training step: distil's loop against TRL's GKD and Distillation trainers, each
in a fresh process.

Same models (SmolLM2-135M-Instruct teacher, the flagship's 10-layer student built from it, embeddings and tied head
frozen), same batches (8 blocks of 64 Shakespeare tokens, in the same order), same optimizer (fused AdamW, constant
lr, gradient clipping at 1), same loss (forward KL at temperature 1, no hard-label CE: distil ``alpha = 1``; TRL
``beta = 0``, and for GKD ``lmbda = 0``: never on-policy), fp32, 2 threads. TRL's DistillationTrainer only trains on
its own generations, so its generation is replaced by the same blocks (``case_trl_distill``). The first step's loss
and gradient norm are printed for each, so that equal work can be checked. Step time is the median over the steps
after ``--warmup``; peak memory is the process's peak resident set above what it held once both models were loaded.

    python benchmarks/step_vs_trl.py --peer-python /work/bench-venv/bin/python --steps 10 --out benchmarks/step_vs_trl.jsonl
    python benchmarks/step_vs_trl.py --table benchmarks/step_vs_trl.jsonl

The peers' venv: ``python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 &&
/work/bench-venv/bin/pip install trl==1.16.0``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
LAYERS = [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]  # the flagship's student
BATCH, SEQ, LR = 8, 64, 1e-4


def _kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def prepare(work: Path, steps: int) -> None:
    """The student folder and the batches, in distil's stream order (the TRL case reads them sequentially)."""
    sys.path.insert(0, SRC)
    import torch

    from distil.config.load import load_recipe
    from distil.data.sources.text import load_corpus
    from distil.models import hf
    from distil.students import make_student

    hf.quiet_transformers()
    recipe = load_recipe("smollm2-distil", ["train.precision=fp32"])
    teacher, tokenizer = hf.load_causal_lm(recipe.teacher.model.source, dtype="float32")
    teacher.save_pretrained(work / "teacher")
    make_student(teacher, layers=LAYERS).save_pretrained(work / "student")
    tokenizer.save_pretrained(work / "student")
    blocks = load_corpus(recipe.data, tokenizer).train[: steps * BATCH]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))  # BatchStream's, seed 0
    torch.save({"blocks": blocks, "ordered": blocks[order]}, work / "data.pt")


def case_distil(work: Path, steps: int) -> dict:
    sys.path.insert(0, SRC)
    import torch
    from transformers import AutoModelForCausalLM

    from distil.config.schema import LossSpec
    from distil.data.stream import BatchStream
    from distil.distill.lm import CausalLMObjective
    from distil.distill.pair import Teacher
    from distil.train.config import TrainConfig
    from distil.train.loop import Stage, train
    from distil.train.metrics import MetricsLog

    torch.set_num_threads(2)
    data = torch.load(work / "data.pt")
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).train()
    student.get_input_embeddings().weight.requires_grad_(False)  # tied: the head too
    blocks = data["blocks"]
    objective = CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=1.0, temperature=1.0),
                                  vocab_size=teacher.config.vocab_size, device=torch.device("cpu"))
    stream = BatchStream(len(blocks), BATCH, lambda i: {"input_ids": blocks[i], "labels": blocks[i].clone(),
                                                        "attention_mask": torch.ones_like(blocks[i])}, seed=0)
    config = TrainConfig(steps=steps, lr=LR, schedule="constant", clip_grad_norm=1.0, precision="fp32", log_every=1)
    log = work / "distil-metrics.jsonl"
    log.unlink(missing_ok=True)
    shutil.rmtree(work / "distil-ckpt", ignore_errors=True)  # a fresh run, not a resumed one
    stage = Stage("bench", objective, stream, config, work / "distil-ckpt", MetricsLog(log, tensorboard=False),
                  torch.device("cpu"))
    base = _kib("VmRSS")
    train(stage, show_progress=False)
    peak = _kib("VmHWM")
    records = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line]
    records = [r for r in records if "tokens_per_s" in r]
    step_s = [BATCH * (SEQ - 1) / r["tokens_per_s"] for r in records]
    return {"first_loss": records[0]["loss"], "first_grad_norm": records[0]["grad_norm"], "step_s": step_s,
            "peak_rss_mib": peak / 1024, "peak_above_models_mib": (peak - base) / 1024}


def _trl_models(work: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    student.get_input_embeddings().weight.requires_grad_(False)
    return teacher, student, AutoTokenizer.from_pretrained(work / "student"), torch.load(work / "data.pt")["ordered"]


def _trl_args(work: Path, steps: int) -> dict:
    """The TrainingArguments both TRL trainers share: distil's optimizer, schedule, clipping and precision."""
    return dict(output_dir=str(work / "trl-out"), per_device_train_batch_size=BATCH, max_steps=steps,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                optim="adamw_torch_fused", temperature=1.0, beta=0.0, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
                disable_tqdm=True)


def _train_timed(make_trainer) -> dict:
    """Step times from the end of one optimizer step to the next, the first step's logged loss and grad norm."""
    from transformers import TrainerCallback

    ends: list[float] = []
    logged: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer = make_trainer([Clock()])
    base = _kib("VmRSS")
    start = time.perf_counter()
    trainer.train()
    peak = _kib("VmHWM")
    marks = [start] + ends
    steps_logged = [entry for entry in logged if "loss" in entry]
    return {"first_loss": steps_logged[0]["loss"], "first_grad_norm": steps_logged[0].get("grad_norm"),
            "step_s": [b - a for a, b in zip(marks, marks[1:])], "peak_rss_mib": peak / 1024,
            "peak_above_models_mib": (peak - base) / 1024}


def case_trl_gkd(work: Path, steps: int) -> dict:
    """GKDTrainer with lmbda 0 (never on-policy): full logits of both models, its generalized JSD at beta 0."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, tokenizer, ordered = _trl_models(work)
    dataset = Dataset.from_dict({"input_ids": ordered.tolist()})

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class InOrder(GKDTrainer):  # distil's batch order, so that the first steps see the same batches
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = GKDConfig(**_trl_args(work, steps), lmbda=0.0, max_length=SEQ)
    return _train_timed(lambda callbacks: InOrder(model=student, teacher_model=teacher, args=args,
                                                  train_dataset=dataset, data_collator=collate,
                                                  processing_class=tokenizer, callbacks=callbacks))


def case_trl_distill(work: Path, steps: int, gradient_checkpointing: bool = False) -> dict:
    """DistillationTrainer (TRL's chunked loss: both heads projected tile by tile, never the full logits). It is
    on-policy only, so its generation is replaced by the fixed blocks: row i's prompt is block i's first token and
    its completion the other 63, the tokens distil scores. Its default gradient checkpointing is a separate case."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    teacher, student, tokenizer, ordered = _trl_models(work)
    dataset = Dataset.from_dict({"prompt": [str(i) for i in range(len(ordered))]})

    class FixedCompletions(DistillationTrainer):
        def _generate(self, prompts):
            rows = [ordered[int(p)] for p in prompts]
            return [r[:1].tolist() for r in rows], [r[1:].tolist() for r in rows], None, None, []

    args = DistillationConfig(**_trl_args(work, steps), shuffle_dataset=False, max_completion_length=SEQ - 1,
                              gradient_checkpointing=gradient_checkpointing)
    return _train_timed(lambda callbacks: FixedCompletions(model=student, teacher_model=teacher, args=args,
                                                           train_dataset=dataset, processing_class=tokenizer,
                                                           callbacks=callbacks))


CASES = {"distil": case_distil, "trl_gkd": case_trl_gkd, "trl_distill": case_trl_distill,
         "trl_distill_ckpt": lambda work, steps: case_trl_distill(work, steps, gradient_checkpointing=True)}


def table(path: Path) -> str:
    """Per trainer, the median over runs of each run's median step, its peak memory and its first step."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cases: dict[str, list[dict]] = {}
    for r in rows:
        cases.setdefault(r["case"], []).append(r)
    step = {case: statistics.median(r["median_step_s"] for r in runs) for case, runs in cases.items()}
    peers = [case for case in ("trl_gkd", "trl_distill") if case in step]
    lines = ["| trainer | runs | step s (median) | tokens/s | " + "".join(f"speed vs {p} | " for p in peers)
             + "peak RSS MiB | above models MiB | first loss | first grad norm |",
             "|---|---:|---:|---:|" + "---:|" * len(peers) + "---:|---:|---:|---:|"]
    for case, runs in cases.items():
        speed = "".join(f"{step[p] / step[case]:.2f}x | " for p in peers)
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        above = statistics.median(r["peak_above_models_mib"] for r in runs)
        lines.append(f"| {case} | {len(runs)} | {step[case]:.3f} | {BATCH * (SEQ - 1) / step[case]:.0f} | {speed}"
                     f"{peak:,.0f} | {above:,.0f} | {runs[0]['first_loss']:.6f} | {runs[0]['first_grad_norm']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), help="internal: run one case here, print JSON")
    ap.add_argument("--work", default="/tmp/step-vs-trl")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--peer-python", default=None, help="the interpreter of the venv that holds TRL")
    ap.add_argument("--cases", default="distil,trl_gkd,trl_distill,trl_distill_ckpt")
    ap.add_argument("--out", default=None, help="append results as JSON lines")
    ap.add_argument("--table", default=None, help="print the markdown table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    work = Path(args.work)
    if args.case:
        result = CASES[args.case](work, args.steps)
        print("RESULT " + json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data.pt").exists():
        prepare(work, args.steps)
    for case in args.cases.split(","):
        python = sys.executable if case == "distil" else (args.peer_python or sys.executable)
        proc = subprocess.run([python, __file__, "--case", case, "--work", str(work), "--steps", str(args.steps)],
                              capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                   "TOKENIZERS_PARALLELISM": "false"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        result = json.loads(line[len("RESULT "):])
        result.update(case=case, median_step_s=statistics.median(result["step_s"][args.warmup:]), steps=args.steps,
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(json.dumps({k: v for k, v in result.items() if k != "step_s"}))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
