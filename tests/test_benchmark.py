"""A recipe's benchmark section: HumanEval pass@1 of each model's greedy completions of the held-out rows.

The end-to-end case uses a tiny Llama whose (tied, frozen) LM head is zero: every logit is 0, greedy decoding picks
token 0, the end-of-sequence token, so every model's completion is empty and each program is exactly prompt + tests.
One held-out prompt already holds a correct body (it passes), the other a wrong one (it fails): pass@1 must be 1/2
for the teacher, the student before training and each arm, whatever the training did to the other layers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distil.config.load import load_recipe, validate_recipe
from distil.errors import ConfigError, DistilError
from distil.measure.benchmark import humaneval_problems, truncate
from distil.runner import run_recipe
from distil.tasks import task_of


def test_a_completion_ends_at_the_next_top_level_statement():
    body = "    total = 0\n    def inner(x):\n        return x\n\n    # a comment in the body\n    return total\n"
    assert truncate(body + "\ndef other():\n    pass\n") == body
    assert truncate(body + "\n# the tests\nassert f() == 0\n") == body
    assert truncate(body + '\nif __name__ == "__main__":\n    f()\n') == body
    assert truncate(body + "\nprint(f())\n") == body
    assert truncate(body) == body  # nested defs and indented comments stay


def test_rows_without_the_benchmark_columns_are_refused_with_the_fix():
    with pytest.raises(DistilError, match="no test, entry_point column; use data.path: humaneval"):
        humaneval_problems([{"prompt": "def f():", "completion": " pass"}], None)
    rows = [{"prompt": f"p{i}", "test": "", "entry_point": "f"} for i in range(5)]
    assert humaneval_problems(rows, 2) == rows[:2]


def problem(name: str, body: str, expected: int) -> dict:
    return {"task_id": name, "prompt": f"def {name}():\n{body}", "completion": "    return 1\n",
            "test": f"def check(candidate):\n    assert candidate() == {expected}\n", "entry_point": name}


@pytest.fixture()
def silent_lm(tiny_lm, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied: the input embeddings too
    folder = tmp_path / "silent"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_lm / name).read_bytes())
    return folder


def test_every_model_is_scored_by_running_its_completions(silent_lm, tmp_path):
    train = [problem(f"train_{i}", "    return 1\n", 1) for i in range(8)]
    held = [problem("right", "    return 2\n", 2), problem("wrong", "    return 3\n", 4)]
    for name, rows in (("train.jsonl", train), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"name": "bench", "task": "causal_lm",
           "data": {"kind": "dataset", "path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "held.jsonl"),
                    "format": "prompt_completion", "max_length": 64},
           "teacher": {"model": {"arch": "hf", "source": str(silent_lm)}},
           "student": {"model": {"arch": "from_teacher", "num_layers": 1}, "freeze_embeddings": True},
           "train": {"steps": 2, "batch_size": 4, "log_every": 1},
           "benchmark": {"max_new_tokens": 8, "batch_size": 2, "timeout_s": 20},
           "output_dir": str(tmp_path / "run"), "generations_shown": 1, "latency_runs": 1}
    summary = run_recipe(validate_recipe(raw), show_progress=False)
    assert summary["metrics"][0] == "pass_at_1"
    for who in ("teacher", "student_init", "student_alone", "distilled"):
        assert summary["arms"][who]["pass_at_1"] == 0.5, who
        records = [json.loads(line) for line in (tmp_path / "run" / "benchmark" / f"{who}.jsonl").read_text()
                   .splitlines()]
        assert [(r["task_id"], r["status"], r["completion"]) for r in records] == [("right", "passed", ""),
                                                                                   ("wrong", "failed", "")]


def test_a_benchmark_needs_rows_of_your_own_data(tiny_lm, tmp_path):
    base = {"name": "bench", "task": "causal_lm", "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}},
            "student": {"model": {"arch": "from_teacher", "num_layers": 1}}, "train": {"steps": 2, "batch_size": 4},
            "benchmark": {}}
    with pytest.raises(ConfigError, match="benchmark scores held-out rows of your own data: use data.kind dataset"):
        validate_recipe({**base, "data": {"kind": "text"}})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": "a", "completion": "b"}) + "\n"
                                                 for _ in range(10)))
    recipe = validate_recipe({**base, "data": {"kind": "dataset", "path": str(tmp_path / "rows.jsonl"),
                                               "format": "prompt_completion", "eval_fraction": 0.2}})
    assert any("no test, entry_point column" in p for p in task_of("causal_lm").deep_problems(recipe))
    with pytest.raises(ConfigError, match="benchmark .* applies to task causal_lm"):
        load_recipe("digits-kd", ["benchmark={max_new_tokens: 8}"])
