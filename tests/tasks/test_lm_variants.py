"""Causal-LM recipes with an attention-relation term: the logit_kd baseline arm and the distilled arm side by side."""

import json

from distil.config.load import validate_recipe
from distil.runner import check, run_recipe


def recipe(tiny_lm, tmp_path, features):
    return validate_recipe({
        "name": "tiny-lm-relations", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 24,
                 "max_train_tokens": 1500, "eval_tokens": 96},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
        "loss": {"alpha": 0.5, "temperature": 2.0, "features": features},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1},
        "arms": ["logit_kd", "distilled"], "output_dir": str(tmp_path / "run"), "generations_shown": 1,
        "latency_runs": 2,
    })


RELATIONS = [{"student": "model.layers.{}.self_attn", "teacher": "model.layers.{}.self_attn", "layers": "last_of_block",
              "loss": "minilm_relations", "num_relation_heads": 2, "weight": 2.0}]


def test_relation_term_in_an_lm_recipe(tiny_lm, tmp_path):
    summary = run_recipe(recipe(tiny_lm, tmp_path, RELATIONS), show_progress=False)
    assert {"teacher", "student_init", "logit_kd", "distilled"} == set(summary["arms"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distilled = [r for r in records if r["arm"] == "distilled" and "loss" in r]
    logit_kd = [r for r in records if r["arm"] == "logit_kd" and "loss" in r]
    assert all(r["loss/feat0_minilm_relations"] > 0 for r in distilled)
    assert all("loss/feat0_minilm_relations" not in r and "loss/kd" in r for r in logit_kd)
    first = distilled[0]
    assert abs(first["loss"] - (0.5 * first["loss/kd"] + 0.5 * first["loss/ce"]
                                + 2.0 * first["loss/feat0_minilm_relations"])) < 1e-4


def test_lm_validate_checks_relation_heads_on_the_real_pair(tiny_lm, tmp_path):
    bad = [dict(RELATIONS[0], num_relation_heads=3)]  # q width 64, k/v width 32 (grouped KV heads)
    (problem,) = check(recipe(tiny_lm, tmp_path, bad))
    assert "3 relation heads do not divide" in problem and "[32, 64]" in problem
