"""`torchrun --nproc_per_node 2 -m distil ...` on CPU (gloo): the recipe is unchanged, the run directory is written
once, two processes with batch b equal bit for bit one process accumulating two micro-batches of b (the same
arithmetic in the same order), a rank SIGKILLed mid-run (after an optimizer step,
or while rank 0 writes a checkpoint) resumes with `torchrun ... -m distil resume` to the uninterrupted result bit for
bit, an FSDP2 run of a causal-LM recipe (teacher sharded, fused LM-head loss) saves loadable Hugging Face folders,
and `distil cache build` splits its shards by rank.

Measured (max |difference| of final weights, 2 processes vs 1): digits-kd bitwise equal per arm (DDP); tiny Llama
recipe under FSDP, against one process with batch 2b, ~2e-6.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import SRC, explain, torchrun
from distil.cli import main as cli_main
from distil.data.sources.sentences import wordnet_problems
from distil.train.checkpoint import list_checkpoints, verify
from distil.train.metrics import TIMING_KEYS

pytestmark = pytest.mark.slow
INJECT = str(Path(__file__).resolve().parent / "inject")
DIGITS = ["teacher.train.steps=20", "train.steps=12", "train.save_every=4", "train.eval_every=6", "train.log_every=1",
          "latency_runs=2"]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def distil(args: list[str], **kwargs):
    return torchrun(["-m", "distil", *args, "-q"], **kwargs)


def _arm_weights(run: Path, arm: str) -> dict[str, torch.Tensor]:
    return load_file(run / arm / "model.safetensors")


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """One process accumulating 2 micro-batches of 8 per step (it also trains the shared teacher), then torchrun:
    two processes with batch 8, uninterrupted, and killed twice."""
    root = tmp_path_factory.mktemp("digits")
    env = {"DISTIL_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CACHE", env["DISTIL_CACHE"])
        with one_thread():  # as each torchrun rank computes (OMP_NUM_THREADS=1)
            assert cli_main(["run", "digits-kd", *DIGITS, "train.batch_size=8", "train.grad_accum=2",
                             f"output_dir={root / 'one'}", "-q"]) == 0
    args = ["run", "digits-kd", *DIGITS, "train.batch_size=8"]
    proc = distil([*args, f"output_dir={root / 'two'}"], env=env)
    assert proc.returncode == 0, explain(proc)
    killed = {}
    for name, plan in {"rank1-after-step": "1:step:7", "rank0-writing-checkpoint": "0:save:6"}.items():
        run = root / name
        proc = distil([*args, f"output_dir={run}"], env={**env, "DISTIL_TEST_KILL": plan, "PYTHONPATH": INJECT})
        assert proc.returncode != 0, "the injected SIGKILL did not happen"
        before = sorted(p.name for p in run.rglob("*") if p.name.startswith((".step-", "step-")))
        proc = distil(["resume", str(run)], env=env)
        assert proc.returncode == 0, explain(proc)
        killed[name] = before
    return root, killed


def test_two_processes_equal_one_through_the_cli(digits):
    """Bit for bit: rank r computes exactly what micro-batch r of the one-process step computes (the same 8 rows, one
    thread), and what is then summed is two terms, in rank order, scaled by powers of two (share 1/2, DDP's mean
    over 2), which fp32 and fp64 add and scale exactly alike. Against one batch of 16 the sums would run in another
    order: equal only to rounding, which the CPU kind and the thread count change (AMD EPYC: 1.2e-5 relative on the
    soft term, 1.4e-6 on the weights with one thread); that invariance, accumulation equals the large batch, is
    tested where its rounding can be bounded (tests/pipelines/test_lm.py, tests/train/test_loop.py)."""
    root, _ = digits
    for arm in ("student", "student_alone"):
        a, b = _arm_weights(root / "two", arm), _arm_weights(root / "one", arm)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
    two = _metrics(root / "two")
    one = [r for r in _metrics(root / "one") if r["arm"] != "teacher"]  # the teacher was trained there, reused here
    assert [(r["arm"], r["step"]) for r in two] == [(r["arm"], r["step"]) for r in one]  # written once
    for x, y in zip(two, one):
        assert {k: v for k, v in x.items() if k.startswith(("loss", "eval/", "grad_norm"))} == \
            {k: v for k, v in y.items() if k.startswith(("loss", "eval/", "grad_norm"))}, (x["arm"], x["step"])


def test_run_directory_written_once(digits):
    root, _ = digits
    run = root / "two"
    assert json.loads((run / "summary.json").read_text())["arms"].keys() == {"teacher", "student_alone", "distilled"}
    for arm in ("student_alone", "distilled"):
        latest = list_checkpoints(run / "checkpoints" / arm)[-1]
        assert latest.name == "step-00000012" and verify(latest) is None
        assert sorted(p.name for p in latest.iterdir()) == [
            "COMPLETE", "modules.safetensors", "optimizer.safetensors", "rng-rank1.safetensors", "rng.safetensors",
            "state.json"]
    assert not list(run.rglob("*.tmp*"))


def test_killed_rank_resumes_to_the_uninterrupted_result(digits):
    root, killed = digits
    # Killed mid-write, rank 0 left an unsealed temporary folder behind; the resume ignored and removed it.
    assert any(name.startswith(".step-") for name in killed["rank0-writing-checkpoint"])
    for name in killed:
        for arm in ("student", "student_alone"):
            a, b = _arm_weights(root / name, arm), _arm_weights(root / "two", arm)
            assert all(torch.equal(a[k], b[k]) for k in b), (name, arm)
        assert _metrics(root / name) == _metrics(root / "two"), name


def lm_recipe(folder: Path, tiny_lm: Path, **extra: str) -> Path:
    path = folder / "lm.yaml"
    path.write_text(f"""
name: tiny-lm
task: causal_lm
data: {{kind: text, train: [sonnets_gut], eval: [phoenix_and_the_turtle_gut], seq_len: 32, max_train_tokens: 3000,
       eval_tokens: 256}}
teacher: {{model: {{arch: hf, source: {tiny_lm}}}}}
student: {{model: {{arch: from_teacher, num_layers: 2}}}}
loss: {{alpha: 0.5, temperature: 2.0}}
train: {{steps: 4, batch_size: 8, log_every: 2, eval_every: 2, precision: fp32}}  # fp32 parity on every CPU kind
generations_shown: 1
latency_runs: 2
""")
    return path


def test_fsdp_causal_lm_recipe_equals_one_process(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM

    recipe = lm_recipe(tmp_path, tiny_lm)
    assert cli_main(["run", str(recipe), f"output_dir={tmp_path / 'one'}", "-q"]) == 0
    proc = distil(["run", str(recipe), "train.batch_size=4", "distributed.strategy=fsdp", "distributed.teacher=shard",
                   f"output_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, explain(proc)
    assert "FSDP2 over 2 processes" in proc.stderr and "teacher: frozen, sharded over 2 processes" in proc.stderr
    for arm in ("student", "student_alone"):
        a, b = _arm_weights(tmp_path / "two", arm), _arm_weights(tmp_path / "one", arm)
        assert set(a) == set(b)  # a tied LM head is saved once, as one process saves it
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 2e-5, f"{arm}: max |difference| {worst}"
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / arm)
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_cache_build_splits_shards_by_rank(tmp_path, tiny_lm):
    recipe = lm_recipe(tmp_path, tiny_lm)
    settings = ["teacher.cache.shard_size=16", "teacher.cache.mode=topk", "teacher.cache.k=8"]
    proc = distil(["cache", "build", str(recipe), f"teacher.cache.path={tmp_path / 'two'}", *settings])
    assert proc.returncode == 0, explain(proc)
    assert cli_main(["cache", "build", str(recipe), f"teacher.cache.path={tmp_path / 'one'}", *settings, "-q"]) == 0
    shards = sorted(p.name for p in (tmp_path / "one").glob("shard-*"))
    assert len(shards) > 4 and shards == sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    for name in [*shards, "manifest.json"]:  # the same bytes, whichever process computed them
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert (tmp_path / "two" / "teacher_eval.json").is_file()


def test_accelerate_launch_runs_the_same_job(digits, tmp_path):
    """`accelerate launch --multi_gpu` starts torch.distributed.run itself: the same environment, the same result.
    (On CPU, `accelerate launch --cpu` runs one process unless an MPI hostfile is given: nothing to test there.)"""
    pytest.importorskip("accelerate", reason="accelerate (pip install distil[llm]) provides `accelerate launch`")
    root, _ = digits
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DISTIL_CACHE": str(root / "cache"), "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    args = ["-m", "distil", "run", "digits-kd", *DIGITS, "train.batch_size=8", f"output_dir={tmp_path / 'run'}", "-q"]
    proc = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, explain(proc)
    assert "DDP over 2 processes" in proc.stderr + proc.stdout
    for arm in ("student", "student_alone"):
        a, b = _arm_weights(tmp_path / "run", arm), _arm_weights(root / "two", arm)
        assert all(torch.equal(a[k], b[k]) for k in b), arm


def test_sigterm_stops_every_rank_after_the_same_step(digits, tmp_path):
    """torchrun forwards SIGTERM to every rank; they agree on the step to stop after, rank 0 saves a sealed
    checkpoint with every rank's RNG, and one line says how to resume. (torchrun itself then exits non-zero.)"""
    root, _ = digits
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DISTIL_CACHE": str(root / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distil",
               "run", "digits-kd", "teacher.train.steps=20", "train.steps=100000", "train.log_every=1",
               "train.batch_size=8", f"output_dir={run}", "-q"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait until both ranks are training
            log = run / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped = re.findall(r"stopped at step (\d+) of 'student_alone'; checkpoint saved\. Continue with: torchrun "
                         r"--nproc_per_node N -m distil resume", out + err)
    assert len(stopped) == 1, out[-2000:] + err[-4000:]
    latest = list_checkpoints(run / "checkpoints" / "student_alone")[-1]
    assert latest.name == f"step-{int(stopped[0]):08d}" and verify(latest) is None
    assert (latest / "rng-rank1.safetensors").is_file()


# The MLP student's hidden activations regress the CNN teacher's through a learned linear projector (32 -> 64). Not a
# CNN student: BatchNorm normalises over each process's own batch under DDP, as in PyTorch (SyncBatchNorm is CUDA-only).
FEATURE_KD = ["arms=[distilled]", "loss.features=[{student: '2', teacher: head.2, loss: mse}, "
              "{student: '2', teacher: head.2, loss: cosine, weight: 0.5}]"]


def test_feature_kd_two_processes_equal_one(digits, tmp_path):
    """A feature-KD recipe (hidden-state MSE and cosine through a learned projector): the student and its projector,
    trained by two processes with batch 8, equal bit for bit one process accumulating two micro-batches of 8 (see
    test_two_processes_equal_one_through_the_cli for why exactly)."""
    root, _ = digits
    args = ["run", "digits-kd", *DIGITS, *FEATURE_KD, "train.batch_size=8"]
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("DISTIL_CACHE", str(root / "cache"))  # the teacher trained by the digits fixture
        assert cli_main([*args, "train.grad_accum=2", f"output_dir={tmp_path / 'one'}", "-q"]) == 0
    proc = distil([*args, f"output_dir={tmp_path / 'two'}"], env={"DISTIL_CACHE": str(root / "cache")})
    assert proc.returncode == 0, explain(proc)
    a, b = _arm_weights(tmp_path / "two", "student"), _arm_weights(tmp_path / "one", "student")
    assert a.keys() == b.keys() and not any("projector" in k for k in a)  # projectors never in the saved student
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = [load_file(list_checkpoints(run / "checkpoints" / "distilled")[-1] / "modules.safetensors")
             for run in (tmp_path / "two", tmp_path / "one")]
    projectors = [k for k in final[1] if not k.startswith("student.")]
    assert projectors, sorted(final[1])  # the projector is trained and checkpointed with the student
    assert all(torch.equal(final[0][k], final[1][k]) for k in projectors)
    two = [r for r in _metrics(tmp_path / "two") if "loss" in r]
    one = [r for r in _metrics(tmp_path / "one") if "loss" in r]
    assert [(r["step"], r["loss"]) for r in two] == [(r["step"], r["loss"]) for r in one]


EMBED_RECIPE = """name: tiny-embed
task: embedding
data: {{kind: sentences, max_train: 64, eval_pairs: 40, max_length: 24}}
teacher: {{model: {{arch: hf, source: {teacher}}}}}
student: {{model: {{arch: from_teacher, num_layers: 2}}}}
loss:
  embedding: cosine
  features:
    - {{student: "encoder.layer.{{}}", teacher: "encoder.layer.{{}}", loss: mse}}
    - {{student: "encoder.layer.{{}}.attention.self", teacher: "encoder.layer.{{}}.attention.self", layers: [[1, 3]],
       loss: minilm_relations}}
train: {{steps: 3, batch_size: 4, lr: 0.001, log_every: 1}}
arms: [student_alone, distilled]
latency_runs: 2
"""


@pytest.mark.skipif(wordnet_problems(None), reason="needs the Debian package wordnet-base")
def test_embedding_recipe_two_processes_equal_one(tmp_path, tiny_bert):
    """The sentence-embedding task under torchrun: in-batch contrastive loss (student_alone), and pooled-embedding,
    hidden-state and attention-relation terms (distilled). Two processes with batch 4 equal bit for bit one process
    accumulating two micro-batches of 4: each rank's in-batch negatives are exactly its micro-batch's (see
    test_two_processes_equal_one_through_the_cli for why exactly)."""
    recipe = tmp_path / "embed.yaml"
    recipe.write_text(EMBED_RECIPE.format(teacher=tiny_bert))
    with one_thread():
        assert cli_main(["run", str(recipe), "train.grad_accum=2", f"output_dir={tmp_path / 'one'}", "-q"]) == 0
    proc = distil(["run", str(recipe), f"output_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, explain(proc)
    for arm in ("student", "student_alone"):
        a, b = _arm_weights(tmp_path / "two", arm), _arm_weights(tmp_path / "one", arm)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [(r["arm"], r["step"], r.get("loss")) for r in two] == [(r["arm"], r["step"], r.get("loss")) for r in one]
    assert (tmp_path / "two" / "report.html").is_file()
