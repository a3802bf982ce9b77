"""Checkpoints at the command line: what each one records, and `distil resume` over damaged ones."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import fault_harness
from reliability_runs import Run, assert_equals_reference


def test_each_checkpoint_records_library_versions_and_the_resolved_recipe(reference):
    recipe = yaml.safe_load((reference.run_dir / "recipe.yaml").read_text())
    folders = sorted((reference.run_dir / "checkpoints").glob("*/step-*"))
    assert len(folders) == 6  # the last two of each of three stages
    for folder in folders:
        state = json.loads((folder / "state.json").read_text())
        assert state["versions"]["torch"] == torch.__version__ and "python" in state["versions"]
        assert "safetensors" in state["versions"] and "distil" in state["versions"]
        assert state["recipe"] == recipe


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":  # as a disk that filled up, or a copy cut short, leaves it
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # garbled: a few flipped bytes in the middle of the tensor data
        middle = len(data) // 2
        data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning_naming_the_file(reference, tmp_path, how):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    during_step_10 = [e[0] for e in reference.events if e[1] == "step" and e[3] == "distilled"][9]
    code, _ = fault_harness.run(run.run_args(), env=run.env, logs=tmp_path / "logs", plan={"kill_at": during_step_10})
    assert code == -9
    folder = run.run_dir / "checkpoints" / "distilled"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000006", "step-00000009"]
    damage(folder / "step-00000009" / "modules.safetensors", how)

    code, child = fault_harness.run(run.next_args(), env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()
    warnings = [line for line in child.output().splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping checkpoint step-00000009: {folder}/step-00000009/modules.safetensors is "
                        "damaged (checksum mismatch); using the previous one"]
    assert_equals_reference(reference, run)  # resumed from step 6: same result


def test_resume_with_every_checkpoint_of_a_stage_damaged_restarts_that_stage(reference, tmp_path):
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    during_step_10 = [e[0] for e in reference.events if e[1] == "step" and e[3] == "distilled"][9]
    code, _ = fault_harness.run(run.run_args(), env=run.env, logs=tmp_path / "logs", plan={"kill_at": during_step_10})
    assert code == -9
    for seal in (run.run_dir / "checkpoints" / "distilled").glob("step-*/COMPLETE"):
        seal.unlink()  # as if the process died before sealing them
    code, child = fault_harness.run(run.next_args(), env=run.env, logs=tmp_path / "logs")
    assert code == 0, child.output()
    assert sum(line.startswith("warning: skipping checkpoint") for line in child.output().splitlines()) == 2
    assert_equals_reference(reference, run)
