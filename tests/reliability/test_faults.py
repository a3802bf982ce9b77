"""Faults a user's machine has: a disk that fills up, two runs on one folder, files from another machine.

The disk is real: a small tmpfs each test mounts (skipped where mounting is not allowed), filled by a ballast file at
a chosen moment; a write that must fail *during* the write runs in a child process under RLIMIT_FSIZE (SIGXFSZ
ignored, so the write returns EFBIG). Runs go through the real CLI (tests/reliability/fault_harness.py), paused at
a chosen event while the disk is filled, then resumed once the space is free: the result must equal the
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import resource
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

import fault_harness
from distil import runlock
from distil.cache import TeacherCache, build_cache
from distil.cache import format as fmt
from distil.cache.writer import atomic_write
from distil.diskspace import DiskFullError
from distil.errors import DistilError
from distil.train import checkpoint as ckpt
from reliability_runs import Run, assert_equals_reference

BLOCK = 4096


# ------------------------------------------------------------------------------------------------ a small disk
@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs of its own: a disk that really fills up."""
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {mounted.stderr.decode().strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a ballast file so that exactly `leave` bytes (a multiple of the block size) stay free."""
    ballast = disk / f"ballast-{time.monotonic_ns()}"
    size = shutil.disk_usage(disk).free - leave
    assert size >= 0 and leave % BLOCK == 0
    ballast.write_bytes(bytes(size))
    assert shutil.disk_usage(disk).free == leave
    return ballast


def blocks(folder: Path) -> int:
    """Bytes the files under `folder` occupy on disk (whole blocks)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


MESSAGE = re.compile(r"disk full writing (\S+): needs ~([\d.]+ (?:bytes|kB|MB)), ([\d.]+ (?:bytes|kB|MB)) free; "
                     r"free space and (.+)")


# ------------------------------------------------------------------------------------------------- checkpoints
def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)  # 66 kB of weights, 132 kB of Adam moments
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 128)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    return ckpt.save_checkpoint(folder, step, modules={"student": model}, optimizer=optimizer, state={"stage": "s"})


def test_checkpoint_on_a_full_disk_is_refused_before_writing_and_written_once_space_is_freed(disk):
    model, optimizer = _model_and_optimizer()
    folder = disk / "checkpoints" / "student"
    first = _save(folder, 1, model, optimizer)
    ballast = fill(disk, 16 * BLOCK)

    with pytest.raises(DiskFullError) as caught:
        _save(folder, 2, model, optimizer)
    message = str(caught.value)
    print(message)
    path, needed, free, then = MESSAGE.fullmatch(message).groups()  # type: ignore[union-attr]
    assert path == str(folder / "step-00000002") and free == "65.5 kB" and then == "run the same command again"
    assert caught.value.needed > blocks(first) > caught.value.free  # the estimate covers what the folder takes
    assert ckpt.list_checkpoints(folder) == [first] and ckpt.verify(first) is None  # the previous one is intact
    assert sorted(p.name for p in folder.iterdir()) == [first.name]  # nothing half-written left

    ballast.unlink()
    second = _save(folder, 2, model, optimizer)
    assert ckpt.verify(second) is None and ckpt.load_latest(folder).step == 2  # type: ignore[union-attr]


def _write_under_file_size_limit(folder: str, limit: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                 pipe: Connection) -> None:
    """In a forked child (only file writes, no torch kernels): the kernel refuses any file past `limit` bytes
    (EFBIG, as SIGXFSZ is ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    messages = []
    for write in (lambda: _save(Path(folder), 2, model, optimizer),
                  lambda: atomic_write(Path(folder) / "shard-000000.safetensors", bytes(2 * limit))):
        try:
            write()
            messages.append("written")
        except DiskFullError as exc:
            messages.append(str(exc))
    pipe.send(messages)


def test_a_write_cut_off_by_the_file_size_limit_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    model, optimizer = _model_and_optimizer()
    folder = tmp_path / "checkpoints" / "student"
    first = _save(folder, 1, model, optimizer)
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_write_under_file_size_limit,
                                                        args=(str(folder), 100_000, model, optimizer, send))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    checkpoint_message, shard_message = receive.recv()
    print(checkpoint_message, shard_message, sep="\n")
    # The weights (66 kB) fit, the optimizer's moments (132 kB) are cut off in the middle of the file.
    assert re.fullmatch(rf"file-size limit reached writing {folder}/step-00000002: needs ~2\d\d\.\d kB, "
                        r"[\d.]+ [kMG]B free; raise the limit \(ulimit -f\) and run the same command again",
                        checkpoint_message), checkpoint_message
    assert shard_message.startswith(f"file-size limit reached writing {folder}/shard-000000.safetensors: needs ~204.")
    assert shard_message.endswith("and run the same build again (finished shards are kept)")
    assert sorted(p.name for p in folder.iterdir()) == [first.name] and ckpt.verify(first) is None
    assert ckpt.verify(_save(folder, 2, model, optimizer)) is None  # without the limit it is written


# ------------------------------------------------------------------------------------------------ cache shards
VOCAB, LENGTH = 50, 16


def _samples() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"id": i, "input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)} for i in range(96)]


def _teacher(on_batch=None):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(2))

    def logits(batch: dict) -> torch.Tensor:
        if on_batch is not None:
            on_batch(batch)
        return table[batch["input_ids"]]

    return logits


def test_cache_build_on_a_disk_that_fills_stops_at_the_shard_and_resumes_to_the_same_cache(disk, tmp_path):
    settings = dict(mode="topk", k=8, shard_size=32, batch_size=16, progress=False)
    reference = tmp_path / "reference"
    build_cache(reference, _samples(), _teacher(), **settings)
    root = disk / "cache"
    ballast: list[Path] = []

    def fill_during_shard_1(batch: dict) -> None:  # the disk fills while shard 1 is computed
        if not ballast and int(batch["id"][0]) >= 32:
            ballast.append(fill(disk, 2 * BLOCK))

    with pytest.raises(DiskFullError) as caught:
        build_cache(root, _samples(), _teacher(fill_during_shard_1), **settings)
    message = str(caught.value)
    print(message)
    path, needed, free, then = MESSAGE.fullmatch(message).groups()  # type: ignore[union-attr]
    assert path == str(root / "shard-000001.safetensors") and free == "8.2 kB"
    assert then == "run the same build again (finished shards are kept)"
    assert sorted(p.name for p in root.iterdir()) == ["build.json", "shard-000000.json", "shard-000000.safetensors"]

    ballast[0].unlink()
    result = build_cache(root, _samples(), _teacher(), **settings)
    assert result.complete and (result.shards_skipped, result.shards_written) == (1, 2)
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in root.iterdir()) == files
    for name in files:
        assert (root / name).read_bytes() == (reference / name).read_bytes(), name


# ------------------------------------------------------------------------------------------- through the CLI
def _event(reference: Run, kind: str, detail: str, stage: str) -> int:
    """Number of the first event of the reference run of this kind, stage, and detail matching a regex."""
    return next(n for n, k, d, s in reference.events if k == kind and s == stage and re.search(detail, d))


def _start_paused(run: Run, event: int, tmp_path: Path, argv: list[str] | None = None
                  ) -> tuple[fault_harness.Child, Path]:
    marker, release = tmp_path / "paused", tmp_path / "release"
    plan = {"pause_at": event, "marker": str(marker), "release": str(release)}
    child = fault_harness.start(argv or run.run_args(), env=run.env, logs=tmp_path / "logs", plan=plan)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.process.is_alive() and time.monotonic() < deadline, child.output()
        time.sleep(0.01)
    return child, release


def _error_lines(child: fault_harness.Child) -> list[str]:
    output = child.output()
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_run_whose_disk_is_full_at_a_checkpoint_is_refused_in_one_line_and_resumes_bitwise_equal(
        reference, disk, tmp_path):
    run = Run(reference.case, disk / "run", tmp_path / "cache")
    # Paused at the event just before the distilled arm's step-6 checkpoint (its last metrics line): the disk fills,
    # leaving 4 blocks, and the checkpoint (~78 kB) is refused before a byte of it is written.
    save = _event(reference, "save_tensors", r"/\.step-00000006\.tmp", "distilled")
    event = max(n for n, kind, _, stage in reference.events if kind == "metrics" and stage == "distilled" and n < save)
    child, release = _start_paused(run, event, tmp_path)
    ballast = fill(disk, 4 * BLOCK)
    release.touch()
    assert child.wait() == 2, child.output()
    [line] = _error_lines(child)
    print(line)
    folder = run.run_dir / "checkpoints" / "distilled"
    path, needed, free, then = MESSAGE.fullmatch(line.removeprefix("error: ")).groups()  # type: ignore[union-attr]
    assert path == str(folder / "step-00000006") and then == f"run `distil resume {run.run_dir}`"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003"] and ckpt.verify(folder / "step-00000003") is None

    ballast.unlink()
    code, child = fault_harness.run(["resume", str(run.run_dir), "-q"], env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()
    assert_equals_reference(reference, run)


def test_run_whose_disk_fills_while_the_final_student_is_written_stops_in_one_line_and_resumes_bitwise_equal(
        reference, disk, tmp_path):
    run = Run(reference.case, disk / "run", tmp_path / "cache")
    # Paused as the student's weights start to be written (its space check has passed): the disk fills, leaving one
    # block, and the 10 kB weights file is cut off half-way.
    child, release = _start_paused(run, _event(reference, "save_tensors", r"/\.student\.tmp-", "distilled"), tmp_path)
    ballast = fill(disk, BLOCK)
    release.touch()
    assert child.wait() == 2, child.output()
    [line] = _error_lines(child)
    print(line)
    path, needed, free, then = MESSAGE.fullmatch(line.removeprefix("error: ")).groups()  # type: ignore[union-attr]
    assert (path, free, then) == (str(run.run_dir / "student"), "4.1 kB", f"run `distil resume {run.run_dir}`")
    assert not (run.run_dir / "student").exists()
    assert [p.name for p in run.run_dir.iterdir() if p.name.startswith(".student")] == []  # the partial folder went

    ballast.unlink()
    code, child = fault_harness.run(["resume", str(run.run_dir), "-q"], env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()
    assert_equals_reference(reference, run)


# ----------------------------------------------------------------------------------------- two runs, one folder
def test_second_run_or_resume_on_a_busy_run_directory_is_refused_and_a_killed_run_resumes_at_once(
        reference, tmp_path):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    first, _ = _start_paused(run, _event(reference, "step", "", "teacher"), tmp_path)
    def files() -> dict[Path, bytes]:  # TensorBoard's writer thread (when installed) may flush on its own: not counted
        return {p: p.read_bytes() for p in run.run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}

    before = files()
    pid = first.process.pid
    for argv in (run.run_args(), ["resume", str(run.run_dir), "-q"]):
        code, other = fault_harness.run(argv, env=run.env, logs=tmp_path / "logs")
        assert code == 2, other.output()
        assert _error_lines(other) == [f"error: {run.run_dir} is in use by another distil run (pid {pid}); wait for "
                                       "it to finish or stop it, or choose another output_dir=PATH (two runs would "
                                       "overwrite each other)"]
    assert files() == before  # the refused runs wrote nothing

    first.process.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
    assert first.wait() == -9
    code, child = fault_harness.run(["resume", str(run.run_dir), "-q"], env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()
    assert_equals_reference(reference, run)


def test_the_lock_is_held_until_released_within_a_process(tmp_path):
    runlock.acquire(tmp_path)
    try:
        with pytest.raises(DistilError, match="is in use by another run in this process"):
            runlock.acquire(tmp_path)
    finally:
        runlock.release(tmp_path)
    runlock.acquire(tmp_path)  # free again
    runlock.release(tmp_path)


# ------------------------------------------------------------------------------ files from another machine
OTHER = {"torch": "1.13.1", "transformers": "4.30.2"}


def _reseal(folder: Path) -> None:
    """Rewrite the COMPLETE seal, as the machine that wrote the edited files would have."""
    names = json.loads((folder / ckpt.SEAL).read_text())["files"]
    ckpt.write_json(folder / ckpt.SEAL, {"files": {name: ckpt._sha256(folder / name) for name in names}})


def _checkpoint_with_versions(tmp_path: Path, versions: dict[str, str] | None) -> ckpt.Checkpoint:
    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path / "checkpoints", 1, model, optimizer)
    state = json.loads((path / "state.json").read_text())
    if versions is None:
        del state["versions"]  # written before versions were recorded
    else:
        state["versions"].update(versions)
    ckpt.write_json(path / "state.json", state)
    _reseal(path)
    return ckpt.load_latest(path.parent)  # type: ignore[return-value]


def test_checkpoint_from_another_torch_and_transformers_release_warns_naming_both_versions(tmp_path):
    loaded = _checkpoint_with_versions(tmp_path, OTHER)
    here = ckpt._versions()
    assert ckpt.resume_warnings(loaded, None) == [
        f"{loaded.path} was written with torch 1.13.1 (this machine has {here['torch']}) and transformers 4.30.2 "
        f"(this machine has {here['transformers']}); resuming from it, but the run will not match an uninterrupted "
        f"one bit for bit (to redo the stage on this machine, delete {loaded.path.parent})"]
    assert loaded.module_state("student").keys() == {"weight", "bias"}  # it still loads


def test_checkpoint_without_recorded_versions_or_from_another_patch_release_loads_with_at_most_a_mild_note(tmp_path):
    assert ckpt.resume_warnings(_checkpoint_with_versions(tmp_path / "old", None), None) == []
    torch_version = ckpt._versions()["torch"]
    patch = re.sub(r"^(\d+\.\d+)\.\d+", r"\g<1>.99", torch_version)
    [note] = ckpt.resume_warnings(_checkpoint_with_versions(tmp_path / "patch", {"torch": patch}), None)
    assert f"torch {patch} -> {torch_version}" in note and "may not match" in note


def test_resume_from_a_checkpoint_of_another_release_warns_in_one_line_through_the_cli(reference, tmp_path):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    during_step_8 = [n for n, kind, _, stage in reference.events if kind == "step" and stage == "distilled"][7]
    code, child = fault_harness.run(run.run_args(), env=run.env, logs=tmp_path / "logs", plan={"kill_at": during_step_8})
    assert code == -9, child.output()
    latest = run.run_dir / "checkpoints" / "distilled" / "step-00000006"
    state = json.loads((latest / "state.json").read_text())
    state["versions"].update(OTHER)  # as if copied from a machine with older torch and transformers
    ckpt.write_json(latest / "state.json", state)
    _reseal(latest)

    code, child = fault_harness.run(["resume", str(run.run_dir), "-q"], env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()
    warned = [line for line in child.output().splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {latest} was written with torch 1.13.1 (this machine "
                                                     f"has {torch.__version__}) and transformers 4.30.2"), warned
    assert_equals_reference(reference, run)  # the tensors load the same: here, the same result


def _edit_manifest_versions(root: Path, versions: dict[str, str] | None) -> None:
    manifest = json.loads((root / fmt.MANIFEST).read_text())
    for record in manifest["shards"]:
        if versions is None:
            del record["versions"]
        else:
            record["versions"].update(versions)
    (root / fmt.MANIFEST).write_text(json.dumps(manifest))


def test_cache_from_another_torch_release_warns_naming_both_versions_and_an_old_cache_loads_silently(tmp_path):
    root = tmp_path / "cache"
    build_cache(root, _samples(), _teacher(), mode="topk", k=8, shard_size=32, progress=False)
    recorded = json.loads((root / fmt.shard_record_file(0)).read_text())["versions"]
    assert recorded["torch"] == torch.__version__ and "transformers" in recorded
    _edit_manifest_versions(root, {"torch": "1.13.1"})
    with pytest.warns(UserWarning) as caught:
        cache = TeacherCache(root)
    assert [str(w.message) for w in caught] == [
        f"the teacher cache {root} was built with torch 1.13.1 (this machine has {torch.__version__}); using it, but "
        "the teacher's targets may differ from what it computes here; rebuild the cache on this machine if results "
        "look off"]
    assert len(cache) == 96

    _edit_manifest_versions(root, None)  # built before versions were recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(TeacherCache(root)) == 96
