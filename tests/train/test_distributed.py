"""Distributed training on CPU (gloo), through real `torchrun` launches of two processes.

Loop level (distributed_worker.py, one launch for all scenarios): 2 processes with batch b per rank train the same
student as 1 process with batch 2b -- logit KD on a classifier and fused LM-head KD on a tiny Llama whose ranks see
different numbers of counted tokens -- under DDP and under FSDP2 (teacher sharded); a crash and resume under each is
bitwise equal to the uninterrupted run, rank by rank; FSDP really shards; its checkpoints keep the single-process
format. The CLI-level tests are in test_distributed_cli.py.

Measured tolerances (max |difference| of the final weights, 2 processes vs 1): classifier ~5e-8 (DDP) and ~7e-8
(FSDP) after 6 AdamW steps; tiny Llama ~6e-6 after 4 steps (mean difference 2e-9: a few elements whose gradients
are near zero, which Adam's normalisation magnifies). The asserts leave about 10x room.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker
from distil.train import checkpoint as ckpt
from distil.train.metrics import TIMING_KEYS, MetricsLog

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
PARITY = ["classifier-ddp", "classifier-fsdp", "lm-ddp", "lm-fsdp"]
SCENARIOS = [*PARITY, "classifier-fsdp-bf16", "resume-ddp", "straight-ddp", "resume-fsdp", "straight-fsdp"]
TOLERANCE = {"classifier": 1e-6, "lm": 5e-5}


def torchrun(args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` (a free port is chosen by the launcher); a PYTHONPATH in
    `env` goes first."""
    env = dict(env or {})
    paths = [env.pop("PYTHONPATH", ""), str(SRC), os.environ.get("PYTHONPATH", "")]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_lm) -> Path:
    out = tmp_path_factory.mktemp("two-processes")
    proc = torchrun([str(HERE / "distributed_worker.py"), str(out), str(tiny_lm), *SCENARIOS], cwd=HERE)
    assert proc.returncode == 0, explain(proc)
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory, tiny_lm) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    for name in PARITY:
        worker.run(name, out, tiny_lm, world=1)
    return out


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{name}.safetensors")


def _records(folder: Path, name: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in MetricsLog(folder / name / "metrics.jsonl",
            tensorboard=False).read()]


@pytest.mark.parametrize("name", PARITY)
def test_two_processes_with_batch_b_equal_one_with_batch_2b(two, one, name):
    a, b = _weights(two, name), _weights(one, name)
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOLERANCE[name.split("-")[0]], f"{name}: max |difference| {worst}"
    initial = worker.classifier_pair()[0].state_dict() if name.startswith("classifier") else None
    if initial is not None:  # it did train
        assert any(not torch.allclose(a[k], initial[k]) for k in a)
    # Metrics are logged once (rank 0), with every term summed over ranks: the same records as one process.
    ra, rb = _records(two, name), _records(one, name)
    assert [(r["step"], sorted(r)) for r in ra] == [(r["step"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb):
        # A loss term is a mean over tokens of sums of log-probability-sized terms; splitting the batch changes the
        # matmul blocking, hence the rounding, by a few fp32 ulps of the largest such terms: of the cross-entropy's
        # size (about log V), whatever the term's own size (the KD term is a small difference of such sums; with
        # OMP_NUM_THREADS=1 it moved by 1.3e-7 on 0.0125).
        scale = max(abs(y.get("loss/ce", 1.0)), 1.0)
        for key in x:
            if key.startswith("loss"):
                tolerance = 16 * torch.finfo(torch.float32).eps * scale
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=tolerance), (name, x["step"], key)
            elif key == "grad_norm":
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (name, x["step"], key)
            elif key.startswith("eval/"):
                assert x[key] == y[key]


def test_fsdp_shards_student_and_teacher(two):
    for name in ("classifier-fsdp", "lm-fsdp"):
        held = json.loads((two / f"{name}.json").read_text())["rank0_holds"]
        # Each parameter is split in two along its first dimension (odd lengths: rank 0 holds the larger half).
        assert held["student"] < 0.55 * held["student_full"], (name, held)
        assert held["teacher"] < 0.55 * held["teacher_full"], (name, held)
    held = json.loads((two / "classifier-ddp.json").read_text())["rank0_holds"]
    assert held["student"] == held["student_full"] and held["teacher"] == held["teacher_full"]


def test_fsdp_bf16_mixed_precision_trains_close_to_fp32(two):
    bf16, fp32 = _weights(two, "classifier-fsdp-bf16"), _weights(two, "classifier-fsdp")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bf16.values())  # fp32 master weights
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16)  # it did compute in bf16
    last = {name: _records(two, name)[-2]["loss"] for name in ("classifier-fsdp-bf16", "classifier-fsdp")}
    assert last["classifier-fsdp-bf16"] == pytest.approx(last["classifier-fsdp"], rel=0.02)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_crash_and_resume_equals_uninterrupted_rank_by_rank(two, strategy):
    resumed, straight = _weights(two, f"resume-{strategy}"), _weights(two, f"straight-{strategy}")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    rng = {}
    for rank in (0, 1):
        a = load_file(two / f"resume-{strategy}-rng-rank{rank}.safetensors")["torch"]
        b = load_file(two / f"straight-{strategy}-rng-rank{rank}.safetensors")["torch"]
        assert torch.equal(a, b), f"rank {rank}'s RNG differs after resuming"
        rng[rank] = a
    assert not torch.equal(rng[0], rng[1])  # each rank draws its own dropout masks
    assert _records(two, f"resume-{strategy}") == _records(two, f"straight-{strategy}")
    # The checkpoint holds every rank's RNG state, sealed with the rest.
    latest = ckpt.load_checkpoint(ckpt.list_checkpoints(two / f"resume-{strategy}" / "ckpt")[-1])
    assert latest.world_size == 2 and ckpt.verify(latest.path) is None
    assert not torch.equal(latest.rank_rng(0)[0]["torch"], latest.rank_rng(1)[0]["torch"])


def test_fsdp_checkpoint_has_the_single_process_format(two, one):
    """Gathered on rank 0: the same files, keys, shapes and optimizer numbering as a one-process checkpoint, so a run
    resumes under any strategy and any number of processes."""
    fsdp = ckpt.load_checkpoint(ckpt.list_checkpoints(two / "lm-fsdp" / "ckpt")[-1])
    single = ckpt.load_checkpoint(ckpt.list_checkpoints(one / "lm-fsdp" / "ckpt")[-1])
    assert fsdp.step == single.step
    assert {k: v.shape for k, v in fsdp.modules.items()} == {k: v.shape for k, v in single.modules.items()}
    assert fsdp.optimizer["param_groups"] == single.optimizer["param_groups"]
    assert sorted(fsdp.optimizer["state"]) == sorted(single.optimizer["state"])
    for index, entries in single.optimizer["state"].items():
        for key, value in entries.items():
            torch.testing.assert_close(fsdp.optimizer["state"][index][key], value, rtol=0, atol=5e-5)
    final = _weights(two, "lm-fsdp")
    assert all(torch.equal(fsdp.module_state("student")[k], final[k]) for k in final)
