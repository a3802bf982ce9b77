"""Teacher generation for response distillation: resumable, de-duplicated; and the response recipe end to end."""

import json
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distil.generate import Sampling, generate_responses, read_generations

PROMPTS = ["Shall I compare thee", "When forty winters", "Shall I compare thee", "Look in thy glass", "From fairest",
           "Thy glass will show"]


def load(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


def test_generation_is_deduplicated_and_resumes_to_the_same_file(tiny_lm, tmp_path):
    model, tokenizer = load(tiny_lm)
    spec = Sampling(max_new_tokens=6, batch_size=2, do_sample=True, temperature=0.9, chat_template=False)
    whole = tmp_path / "whole.jsonl"
    records = generate_responses(model, tokenizer, PROMPTS, whole, spec=spec, teacher_id="tiny", show_progress=False)
    assert [r["prompt"] for r in records] == list(dict.fromkeys(PROMPTS))  # the duplicate is answered once
    assert len(read_generations(whole)) == 5
    first = records[0]
    assert first["teacher"] == "tiny" and first["settings"]["max_new_tokens"] == 6 and first["prompt_tokens"] > 0
    assert 0 < first["response_tokens"] <= 6

    # An interrupted run: two answers written, then a torn half line. Resuming gives the same file.
    lines = whole.read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])
    resumed = generate_responses(model, tokenizer, PROMPTS, partial, spec=spec, teacher_id="tiny", show_progress=False)
    assert resumed == records
    assert partial.read_text() == whole.read_text()


def test_a_partly_written_batch_is_generated_again_to_the_same_bytes(tiny_lm, tmp_path):
    """A kill while a batch was being written leaves some of its answers on disk (and maybe a torn line). The batch is
    answered again whole, with its own seed: the file ends byte for byte as an uninterrupted run writes it."""
    model, tokenizer = load(tiny_lm)
    spec = Sampling(max_new_tokens=6, batch_size=2, do_sample=True, temperature=0.9, chat_template=False)
    whole = tmp_path / "whole.jsonl"
    generate_responses(model, tokenizer, PROMPTS, whole, spec=spec, teacher_id="tiny", seed=3, show_progress=False)
    lines = whole.read_text().splitlines(keepends=True)
    assert len(lines) == 5  # batches [0, 1], [2, 3], [4] of the distinct prompts
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:3]) + lines[3][:20])  # batch 1: one answer on disk, then a torn line
    generate_responses(model, tokenizer, PROMPTS, partial, spec=spec, teacher_id="tiny", seed=3, show_progress=False)
    assert partial.read_bytes() == whole.read_bytes()


def test_greedy_generation_matches_single_prompt_generation(tiny_lm, tmp_path):
    """Left padding in batches must not change greedy answers."""
    model, tokenizer = load(tiny_lm)
    spec = Sampling(max_new_tokens=5, batch_size=4, chat_template=False)
    batched = generate_responses(model, tokenizer, PROMPTS, tmp_path / "a.jsonl", spec=spec, teacher_id="t",
                                 show_progress=False)
    single = generate_responses(model, tokenizer, PROMPTS, tmp_path / "b.jsonl",
                                spec=replace(spec, batch_size=1), teacher_id="t", show_progress=False)
    assert [r["response"] for r in batched] == [r["response"] for r in single]


def test_response_recipe_end_to_end(tiny_lm, tmp_path):
    from distil.config.load import validate_recipe
    from distil.runner import run_recipe

    recipe = validate_recipe({
        "name": "tiny-response", "task": "causal_lm", "method": "response",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 64,
                 "max_train_tokens": 2000, "eval_tokens": 128},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
        "generate": {"num_prompts": 8, "eval_prompts": 3, "max_new_tokens": 8, "batch_size": 4},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1},
        "output_dir": str(tmp_path / "run"), "generations_shown": 1,
    })
    summary = run_recipe(recipe, show_progress=False)
    assert len(read_generations(tmp_path / "run" / "generations.jsonl")) == 8
    assert len(read_generations(tmp_path / "run" / "eval_generations.jsonl")) == 3
    for arm in ("teacher", "student_init", "student_alone", "distilled"):
        assert summary["arms"][arm]["response_perplexity"] > 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "response_perplexity" in saved["metrics"]
    assert torch.isfinite(torch.tensor(saved["arms"]["distilled"]["perplexity"]))
