"""Recipes on a user's own language-model dataset (data.kind: dataset): chat and prompt_completion files through the
causal-LM task, scored on the held-out examples' trained tokens only, with response and on-policy distillation
taking their prompts from the dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distil.config.load import validate_recipe
from distil.data.sources import load_data
from distil.data.sources.text import shakespeare_dir
from distil.errors import ConfigError
from distil.measure.lm import perplexity_and_predictions
from distil.runner import run_recipe
from distil.tasks import task_of


def sonnet_lines(count: int) -> list[str]:
    text = (shakespeare_dir() / "sonnets_gut.txt").read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 25]
    return lines[100 : 100 + count]


def write_chats(path, count: int = 40) -> None:
    lines = sonnet_lines(2 * count)
    rows = [{"messages": [{"role": "system", "content": "You are a poet."},
                          {"role": "user", "content": lines[2 * i]},
                          {"role": "assistant", "content": lines[2 * i + 1]}]} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_pairs(path, count: int = 40) -> None:
    lines = sonnet_lines(2 * count)
    rows = [{"question": lines[2 * i], "answer": " " + lines[2 * i + 1]} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def recipe(teacher_dir, tmp_path, data, **changes):
    raw = {
        "name": "own-data", "task": "causal_lm", "data": {"kind": "dataset", "max_length": 64, **data},
        "teacher": {"model": {"arch": "hf", "source": str(teacher_dir)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
        "loss": {"alpha": 0.5, "temperature": 1.0},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1},
        "output_dir": str(tmp_path / "run"), "generations_shown": 2, "latency_runs": 1,
    }
    raw.update(changes)
    return validate_recipe(raw)


def test_chat_recipe_scores_only_the_held_out_assistant_tokens(chat_lm, tmp_path):
    write_chats(tmp_path / "chats.jsonl")
    spec = recipe(chat_lm, tmp_path, {"path": str(tmp_path / "chats.jsonl"), "format": "chat", "eval_fraction": 0.2,
                                                    "max_length": 200})
    summary = run_recipe(spec, show_progress=False)
    assert set(summary["arms"]) == {"teacher", "student_init", "student_alone", "distilled"}
    tokenizer = AutoTokenizer.from_pretrained(chat_lm)
    # The held-out conversations (8 of 40), each scored on its assistant turn and the <|im_end|> after it.
    corpus = load_data(spec.data, seed=spec.seed, tokenizer=tokenizer).corpus
    assert len(corpus.eval) == 8 and corpus.packed
    scored = sum(int((b["labels"][:, 1:] != -100).sum()) for b in corpus.eval_batches())
    assert summary["eval_tokens"] == scored
    for row in corpus.eval:  # the scored tokens decode to the assistant's line and its end-of-turn
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tokenizer.decode(trained).endswith("<|im_end|>\n")
    teacher = AutoModelForCausalLM.from_pretrained(chat_lm)
    ppl, predictions = perplexity_and_predictions(teacher, corpus.eval_batches(), vocab_size=len(tokenizer))
    assert len(predictions) == scored and ppl == pytest.approx(summary["arms"]["teacher"]["perplexity"], rel=1e-6)
    prompts = [g["prompt"] for g in summary["generations"]]
    assert len(prompts) == 2 and all(p.startswith("<|im_start|>system") and p.endswith("<|im_start|>assistant\n")
                                     for p in prompts)


def test_heldout_perplexity_counts_trained_tokens_only(chat_lm):
    """exp of the mean CE over exactly the positions whose next token is trained on, computed by hand."""
    from distil.data.formats import Example
    from distil.data.packing import padded_batch

    model = AutoModelForCausalLM.from_pretrained(chat_lm).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, first in ((12, 5), (7, 2), (9, 9)):  # the last one is all prompt: nothing scored
        ids = torch.randint(2, 300, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * first + ids[first:]))
    batch = padded_batch(examples, pad_id=1)
    ppl, predictions = perplexity_and_predictions(model, [batch], vocab_size=300)
    nll, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :, :300].double().log_softmax(-1)
        for t in range(len(example.input_ids) - 1):
            if example.labels[t + 1] != -100:
                nll -= float(logp[t, example.input_ids[t + 1]])
                count += 1
    assert count == 7 + 5 and len(predictions) == count
    # fp32 logits against float64 log-softmax: a relative error of a few fp32 ulps of the mean NLL
    assert math.log(ppl) == pytest.approx(nll / count, rel=1e-5)


def test_response_and_onpolicy_take_their_prompts_from_the_dataset(tiny_lm, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    data = {"path": str(tmp_path / "pairs.jsonl"), "format": "prompt_completion", "eval_fraction": 0.1,
            "columns": {"prompt": "question", "completion": "answer"}, "packing": False}
    spec = recipe(tiny_lm, tmp_path / "response", data, method="response",
                  generate={"num_prompts": 8, "eval_prompts": 2, "max_new_tokens": 6})
    run_recipe(spec, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "response/run/generations.jsonl").read_text().splitlines()]
    questions = {r["question"] for r in map(json.loads, (tmp_path / "pairs.jsonl").read_text().splitlines())}
    assert len(records) == 8 and all(r["prompt"] in questions for r in records)  # the prompt column, as written

    onpolicy = recipe(tiny_lm, tmp_path / "onpolicy", data, arms=["distilled"],
                      onpolicy={"lmbda": 1.0, "max_new_tokens": 4, "start_step": 1})
    summary = run_recipe(onpolicy, show_progress=False)
    assert math.isfinite(summary["arms"]["distilled"]["perplexity"])


def test_response_logits_trains_on_the_teachers_answers_with_its_logits_as_the_soft_term(tiny_lm, tmp_path):
    """Both kinds of distillation at once: the distilled arm reads the teacher's answers (as method response) and
    its loss is alpha x the teacher's soft term on them + (1 - alpha) x their CE; method response has no soft term."""
    write_pairs(tmp_path / "pairs.jsonl")
    data = {"path": str(tmp_path / "pairs.jsonl"), "format": "prompt_completion", "eval_fraction": 0.1,
            "columns": {"prompt": "question", "completion": "answer"}, "packing": False}
    generate = {"num_prompts": 8, "eval_prompts": 2, "max_new_tokens": 6}
    logged = {}
    for method in ("response", "response_logits"):
        summary = run_recipe(recipe(tiny_lm, tmp_path / method, data, method=method, arms=["distilled"],
                                    generate=generate), show_progress=False)
        assert "response_perplexity" in summary["metrics"]  # scored on the teacher's held-out answers, as response
        answers = (tmp_path / method / "run/generations.jsonl").read_text().splitlines()
        assert len(answers) == 8
        metrics = (tmp_path / method / "run/metrics.jsonl").read_text().splitlines()
        logged[method] = [r for r in map(json.loads, metrics) if r.get("arm") == "distilled" and "loss" in r]
    assert logged["response"] and not any("loss/kd" in r for r in logged["response"])
    both = logged["response_logits"]
    assert both and all(r["loss/kd"] > 0 for r in both)
    assert all(r["loss"] == pytest.approx(0.5 * r["loss/kd"] + 0.5 * r["loss/ce"], rel=1e-5) for r in both)
    assert "use distributed.teacher: replicate" in refused(tiny_lm, tmp_path, data, method="response_logits",
                                                           generate=generate, distributed={"teacher": "shard"})


def refused(*args, **changes) -> str:
    with pytest.raises(ConfigError) as caught:
        recipe(*args, **changes)
    return str(caught.value)


def test_dataset_recipe_rules(tiny_lm, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    data = {"path": str(tmp_path / "pairs.jsonl"), "format": "prompt_completion"}
    assert "set data.packing: false" in refused(tiny_lm, tmp_path, data, onpolicy={"lmbda": 0.5})
    cache = {"model": {"arch": "hf", "source": str(tiny_lm)}, "cache": {"path": str(tmp_path / "c")}}
    assert "remove teacher.cache" in refused(tiny_lm, tmp_path, data, teacher=cache)
    assert "the dataset's own" in refused(tiny_lm, tmp_path, data, method="response", arms=["distilled"],
                                          generate={"prompts": str(tmp_path / "p.jsonl")})
    assert "start_step (3) must be below train.steps" in refused(
        tiny_lm, tmp_path, {**data, "packing": False}, onpolicy={"start_step": 3})
    assert "format" in refused(tiny_lm, tmp_path, {**data, "format": "markdown"})
    missing = recipe(tiny_lm, tmp_path, {"path": str(tmp_path / "nothing.jsonl"), "format": "chat"})
    assert task_of("causal_lm").problems(missing) == [f"data.path: {tmp_path / 'nothing.jsonl'} matches no file"]


def test_a_student_whose_chat_template_renders_other_tokens_is_refused_before_training(chat_lm, tmp_path):
    import shutil

    write_chats(tmp_path / "chats.jsonl")
    other = tmp_path / "other-template"
    shutil.copytree(chat_lm, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|turn|>")
    tokenizer.save_pretrained(other)
    data = {"path": str(tmp_path / "chats.jsonl"), "format": "chat", "max_length": 200}
    spec = recipe(chat_lm, tmp_path, data, student={"model": {"arch": "hf", "source": str(other)}})
    [problem] = task_of("causal_lm").deep_problems(spec)
    assert "chat templates render a conversation differently" in problem
    same = recipe(chat_lm, tmp_path, data, student={"model": {"arch": "hf", "source": str(chat_lm)}})
    assert task_of("causal_lm").deep_problems(same) == []


def test_verified_response_keeps_passing_teacher_answers_and_references_elsewhere(tiny_lm, tmp_path):
    from rich.console import Console

    from distil.tasks.response import verified_answers

    def problem(name: str, body: str) -> dict:
        return {"prompt": f"def {name}(x):\n    \"\"\"Return x plus one.\"\"\"\n", "canonical_solution": body,
                "test": "def check(f):\n    assert f(1) == 2\n    assert f(-3) == -2\n", "entry_point": name}

    rows = [problem("inc", "    return x + 1\n"), problem("succ", "    return 1 + x\n")]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"path": str(path), "eval_path": str(path), "format": "prompt_completion", "packing": False,
            "columns": {"prompt": "prompt", "completion": "canonical_solution"}}
    spec = recipe(tiny_lm, tmp_path, data, method="response", generate={"verify": True})
    answers = [
        # right, then a new top-level statement that the stop sequences cut off (it would fail if kept)
        {"prompt": rows[0]["prompt"], "response": "    return x + 1\n\ndef broken(:\n"},
        {"prompt": rows[1]["prompt"], "response": "    return x * 2\n"},  # wrong: f(-3) == -6
        {"prompt": "def other():\n", "response": "    pass\n"},  # no row with tests, no reference: dropped
    ]
    pairs = [(r["prompt"], r["canonical_solution"]) for r in rows] + [("def other():\n", None)]
    kept = verified_answers(spec, answers, pairs, tmp_path / "verified.jsonl", Console(quiet=True))
    assert [(k["source"], k["response"]) for k in kept] == [("teacher", "    return x + 1\n"),
                                                            ("reference", "    return 1 + x\n")]
    outcomes = [json.loads(line) for line in (tmp_path / "verified.jsonl").read_text().splitlines()]
    assert [(o["tested"], o["passed"], o["kept"]) for o in outcomes] == [
        (True, True, "teacher"), (True, False, "reference"), (False, False, "dropped")]
