"""Teacher generation (`distil generate`, with sampling) killed inside a batch resumes to the uninterrupted bytes.

Two kills, both placed deterministically: a SIGKILL in the middle of sampling a batch (at a forward pass of the
teacher, one per generated token), and a kill inside the write of a batch's lines (the write that would take the file
past a chosen byte, in the middle of the batch's last line, dies of SIGXFSZ): that one leaves part of the batch on
disk, which an earlier version answered again grouped and seeded differently.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

import fault_harness
from reliability_runs import COUNTS

BATCH = 3


def _argv(tiny_lm: Path, prompts: Path, output: Path) -> list[str]:
    return ["generate", "--teacher", str(tiny_lm), "--prompts", str(prompts), "-o", str(output), "--sample",
            "--temperature", "1.3", "--batch-size", str(BATCH), "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def reference(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """The prompts file, an uninterrupted generation and its events."""
    root = tmp_path_factory.mktemp("generate")
    prompts = root / "prompts.jsonl"
    lines = [f"Sonnet {i}: " + "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 4
             for i in range(3 * BATCH)]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    output = root / "whole.jsonl"
    code, child = fault_harness.run(_argv(tiny_lm, prompts, output), env={}, logs=root / "logs", plan={"record": True})
    assert code == 0, child.output()
    assert len(output.read_text().splitlines()) == 3 * BATCH
    return prompts, output, child.outcome()["events"]


def _resume_and_compare(tiny_lm: Path, prompts: Path, output: Path, whole: Path, logs: Path) -> None:
    code, child = fault_harness.run(_argv(tiny_lm, prompts, output), env={}, logs=logs)
    assert code == 0, child.output()
    assert output.read_bytes() == whole.read_bytes()
    assert not list(output.parent.glob("*.tmp"))
    COUNTS["delivered"] += 1
    COUNTS["scenarios"] += 1


def test_killed_while_sampling_a_batch(reference, tiny_lm, tmp_path):
    prompts, whole, events = reference
    # The teacher's forward passes between the first batch's fsync and the second's: sampling batch 1.
    syncs = [n for n, kind, *_ in events if kind == "fsync"]
    forwards = [n for n, kind, *_ in events if kind == "forward" and syncs[-3] < n < syncs[-2]]
    assert len(forwards) > 2
    output = tmp_path / "answers.jsonl"
    code, child = fault_harness.run(_argv(tiny_lm, prompts, output), env={}, logs=tmp_path / "logs",
                                    plan={"kill_at": forwards[len(forwards) // 2]})
    assert code == -9, f"the kill did not happen (exit {code}):\n{child.output()}"
    assert len(output.read_text().splitlines()) == BATCH  # batch 0 only
    _resume_and_compare(tiny_lm, prompts, output, whole, tmp_path / "logs")


def test_killed_while_writing_a_batch(reference, tiny_lm, tmp_path):
    prompts, whole, _ = reference
    # A byte in the middle of the last line of batch 1: its first lines reach the disk, the rest does not.
    lines = whole.read_bytes().splitlines(keepends=True)
    limit = sum(map(len, lines[: 2 * BATCH - 1])) + len(lines[2 * BATCH - 1]) // 2
    output = tmp_path / "answers.jsonl"
    code, child = fault_harness.run(_argv(tiny_lm, prompts, output), env={}, logs=tmp_path / "logs",
                                    plan={"file_size_limit": limit})
    assert code == -signal.SIGXFSZ, f"the kill (SIGXFSZ) did not happen (exit {code}):\n{child.output()}"
    assert output.stat().st_size == limit  # it landed in this file's write, not in another file
    _resume_and_compare(tiny_lm, prompts, output, whole, tmp_path / "logs")
