"""The causal_lm teacher stage (`teacher.train`): the teacher is fine-tuned on the training data before it teaches,
exactly as the student-alone arm would train it, kept in $DISTIL_CACHE/teachers and reused by later runs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distil.config.load import validate_recipe
from distil.errors import ConfigError
from distil.runner import run_recipe
from distil.tasks import causal_lm_teacher
from distil.tasks.artifacts import arm_folder

LORA = {"r": 4, "alpha": 8.0}
TRAIN = {"steps": 3, "batch_size": 4, "lr": 0.02, "log_every": 1, "precision": "fp32"}


def recipe(tiny_lm, out, **changes):
    raw = {
        "name": "tiny-teacher-stage", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 24,
                 "max_train_tokens": 1500, "eval_tokens": 96},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}, "train": TRAIN, "lora": LORA},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "train": {"steps": 2, "batch_size": 4, "lr": 0.01, "log_every": 1, "precision": "fp32"},
        "arms": ["distilled"], "output_dir": str(out), "generations_shown": 0, "latency_runs": 1,
    }
    raw.update(changes)
    return validate_recipe(raw)


def test_teacher_stage_equals_the_alone_arm_on_the_teacher_and_is_reused(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    tuned_recipe = recipe(tiny_lm, tmp_path / "a")
    folder = causal_lm_teacher.tuned_teacher_folder(tuned_recipe, tiny_lm)
    summary = run_recipe(tuned_recipe, show_progress=False)
    tuned = load_file(str(folder / "model.safetensors"))
    source = load_file(str(tiny_lm / "model.safetensors"))
    changed = {k for k in source if not torch.equal(source[k], tuned[k])}
    assert set(tuned) == set(source) and changed and all(k.endswith("proj.weight") for k in changed)

    # The stage is the student-alone arm applied to the teacher: the same data order, adapters and steps, bit for bit.
    alone = recipe(tiny_lm, tmp_path / "alone", teacher={"model": {"arch": "hf", "source": str(tiny_lm)}},
                   student={"model": {"arch": "hf", "source": str(tiny_lm)}, "lora": LORA}, train=TRAIN,
                   arms=["student_alone"])
    run_recipe(alone, show_progress=False)
    by_alone = load_file(str(arm_folder(tmp_path / "alone", "student_alone") / "model.safetensors"))
    assert all(torch.equal(by_alone[k], tuned[k]) for k in tuned)

    # The run was measured against the tuned teacher, not the pretrained one.
    plain = run_recipe(recipe(tiny_lm, tmp_path / "plain", teacher={"model": {"arch": "hf", "source": str(tiny_lm)}}),
                       show_progress=False)
    assert summary["arms"]["teacher"]["perplexity"] != plain["arms"]["teacher"]["perplexity"]

    # A second run with the same teacher stage reuses the folder (and gets the same student).
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = run_recipe(recipe(tiny_lm, tmp_path / "b"), show_progress=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not (tmp_path / "b" / "checkpoints" / "teacher").exists()
    first = load_file(str(arm_folder(tmp_path / "a", "distilled") / "model.safetensors"))
    second = load_file(str(arm_folder(tmp_path / "b", "distilled") / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["arms"]["teacher"]["perplexity"] == summary["arms"]["teacher"]["perplexity"]


def test_teacher_stage_is_refused_where_it_does_not_apply(tiny_lm, tmp_path):
    teacher = {"model": {"arch": "hf", "source": str(tiny_lm)}}
    with pytest.raises(ConfigError, match="add teacher.train"):
        recipe(tiny_lm, tmp_path, teacher={**teacher, "lora": LORA})
    with pytest.raises(ConfigError, match="use ddp"):
        recipe(tiny_lm, tmp_path, distributed={"strategy": "fsdp"})
    with pytest.raises(ConfigError, match="build the cache from the tuned teacher"):
        recipe(tiny_lm, tmp_path, teacher={**teacher, "train": TRAIN, "cache": {"path": str(tmp_path / "c")}})


def test_generate_from_a_recipe_with_a_teacher_stage_waits_for_the_tuned_teacher(tiny_lm, tmp_path, monkeypatch, capsys):
    import yaml

    from distil.cli import main

    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    raw = recipe(tiny_lm, tmp_path / "run", method="response",
                 generate={"num_prompts": 2, "eval_prompts": 1, "max_new_tokens": 4, "batch_size": 2}).model_dump(
        mode="json", exclude_unset=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["generate", str(path), "-o", str(tmp_path / "answers.jsonl")]) != 0
    assert "fine-tunes its teacher first" in capsys.readouterr().err
