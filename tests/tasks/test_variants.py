"""Every classification arm end to end on digits (tiny budgets): feature terms, self-distillation, multi-teacher."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distil.config.load import validate_recipe
from distil.errors import ConfigError
from distil.models.vision import build_classifier
from distil.runner import check, resume_run, run_recipe
from distil.tasks import classification_arms
from distil.tasks.artifacts import ARM_FOLDERS

pytest.importorskip("sklearn", reason="the digits dataset comes with scikit-learn")


def recipe(tmp_path, **changes):
    data = {
        "name": "digits-variants", "task": "classification", "data": {"name": "digits", "eval_size": 200},
        "teacher": {"model": {"arch": "cnn", "channels": [8, 16], "hidden_size": 32},
                    "train": {"steps": 8, "batch_size": 32, "lr": 0.01}},
        "student": {"model": {"arch": "cnn", "channels": [4, 8], "hidden_size": 16}},
        "loss": {"alpha": 0.8, "temperature": 3.0, "features": [
            {"student": "features.7", "teacher": "features.7", "loss": "fitnets"},
            {"student": "features.{}", "teacher": "features.{}", "layers": [[3, 3], [7, 7]], "loss": "at"},
            {"student": "head.2", "teacher": "head.2", "loss": "rkd_angle", "weight": 0.5},
        ]},
        "train": {"steps": 4, "batch_size": 16, "subset": 64, "lr": 0.01, "log_every": 2},
        "self_distill": {"born_again": {"generations": 2}},
        "arms": ["student_alone", "logit_kd", "distilled", "born_again", "ema", "deep_supervision"],
        "output_dir": str(tmp_path / "run"), "latency_runs": 2,
    }
    data.update(changes)
    return validate_recipe(data)


def test_all_arms_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    teachers_seen = {}
    original = classification_arms.train_classifier

    def spy(name, model, teacher, *args, **kwargs):
        teachers_seen[name] = None if teacher is None else {k: v.clone() for k, v in teacher.model.state_dict().items()}
        return original(name, model, teacher, *args, **kwargs)

    monkeypatch.setattr(classification_arms, "train_classifier", spy)
    summary = run_recipe(recipe(tmp_path), show_progress=False)
    run = tmp_path / "run"
    arms = summary["arms"]
    assert set(arms) == {"teacher", "student_alone", "logit_kd", "distilled", "born_again", "ema", "deep_supervision"}
    assert all(0 <= values["accuracy"] <= 1 for values in arms.values())

    # Born-again generations chain: generation k's teacher is generation k-1's saved weights (0 = student_alone).
    assert teachers_seen["student_alone"] is None
    for k, previous in ((1, run / "student_alone"), (2, run / "born_again-gen1")):
        saved = load_file(previous / "model.safetensors")
        assert all(torch.equal(saved[key], value) for key, value in teachers_seen[f"born_again-gen{k}"].items())
    assert len(arms["born_again"]["generation_accuracy"]) == 3
    assert arms["born_again"]["accuracy"] == arms["born_again"]["generation_accuracy"][-1]
    assert arms["born_again"]["generation_accuracy"][0] == arms["student_alone"]["accuracy"]

    # Every exit's accuracy; the deepest is the saved model's own.
    exits = arms["deep_supervision"]["exit_accuracy"]
    assert list(exits) == ["features.3", "output"] and exits["output"] == arms["deep_supervision"]["accuracy"]
    assert 0 <= arms["ema"]["ema_accuracy"] <= 1

    # Projectors, exits and the EMA copy are trained and checkpointed, but the saved students are plain classifiers.
    plain = set(build_classifier(recipe(tmp_path).student.model, (1, 8, 8), 10).state_dict())
    for arm in ("distilled", "deep_supervision", "ema"):
        folder = run / ARM_FOLDERS[arm]
        assert set(load_file(folder / "model.safetensors")) == plain
    checkpoints = sorted((run / "checkpoints" / "distilled").glob("step-*"))
    names = set(load_file(checkpoints[-1] / "modules.safetensors"))
    assert any("projectors" in key for key in names)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    distilled = next(r for r in records if r["arm"] == "distilled" and "loss" in r)
    assert {"loss/kd", "loss/feat0_fitnets", "loss/feat1_at", "loss/feat2_rkd_angle"} <= set(distilled)
    assert {"loss/exit_kd", "loss/exit_hint"} <= set(next(r for r in records if r["arm"] == "deep_supervision"))
    assert summary == json.loads((run / "summary.json").read_text())

    again = resume_run(run, show_progress=False)  # every stage is done: nothing is retrained
    assert again["arms"]["born_again"]["generation_accuracy"] == arms["born_again"]["generation_accuracy"]


def test_multi_teacher_arm(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    second = {"model": {"arch": "mlp", "hidden_sizes": [32]}, "train": {"steps": 8, "batch_size": 32}, "seed": 1}
    r = recipe(tmp_path, arms=["distilled"], loss={"alpha": 0.8, "temperature": 3.0},
               multi_teacher={"teachers": [second], "combine": "per_teacher", "weights": [2, 1]})
    summary = run_recipe(r, show_progress=False)
    assert {"teacher", "teacher1", "distilled"} == set(summary["arms"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/kd_teacher1" in r for r in records if r["arm"] == "distilled")


def test_validate_finds_wrong_module_names_and_schema_mistakes(tmp_path):
    bad = recipe(tmp_path, loss={"features": [{"student": "feature.7", "teacher": "features.7", "loss": "mse"}]})
    (problem,) = check(bad)
    assert "loss.features[0]" in problem and "close matches: features.7" in problem
    with pytest.raises(ConfigError, match="projector applies to"):
        recipe(tmp_path, loss={"features": [{"student": "a", "teacher": "b", "loss": "at", "projector": "always"}]})
    with pytest.raises(ConfigError, match="layer templates"):
        recipe(tmp_path, loss={"features": [{"student": "a.{}", "teacher": "b", "loss": "mse"}]})
    with pytest.raises(ConfigError, match="add distilled to arms"):
        recipe(tmp_path, arms=["student_alone"])
    with pytest.raises(ConfigError, match="multi_teacher.weights needs 2"):
        recipe(tmp_path, multi_teacher={"teachers": [{"model": {"arch": "mlp"}}], "weights": [1, 2, 3]})
