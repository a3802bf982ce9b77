"""Causal-LM distillation on a tiny real Llama (random weights, real BPE tokenizer, real Shakespeare text)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distil.config.load import validate_recipe
from distil.config.schema import LossSpec, OnPolicySpec, TrainSpec
from distil.data.stream import BatchStream
from distil.distill.lm import CausalLMObjective
from distil.distill.pair import Teacher
from distil.runner import run_recipe
from distil.tasks.response import collate_pairs, tokenize_pair
from distil.students import make_student
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog

CPU = torch.device("cpu")


def recipe(tiny_lm, tmp_path, **changes):
    data = {
        "name": "tiny-lm", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 32,
                 "max_train_tokens": 3000, "eval_tokens": 256},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}},
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "train": {"steps": 4, "batch_size": 4, "log_every": 2, "eval_every": 2},
        "output_dir": str(tmp_path / "run"), "generations_shown": 2,
    }
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_recipe(data)


def models(tiny_lm):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    student = make_student(teacher, num_layers=2).train()
    return teacher, student, AutoTokenizer.from_pretrained(tiny_lm)


def test_logit_recipe_end_to_end(tiny_lm, tmp_path):
    summary = run_recipe(recipe(tiny_lm, tmp_path), show_progress=False)
    run = tmp_path / "run"
    assert set(summary["arms"]) == {"teacher", "student_init", "student_alone", "distilled"}
    for values in summary["arms"].values():
        assert values["perplexity"] > 1 and 0 <= values["agreement"] <= 1 and values["params"] > 0
        assert values["tokens_per_s_b1"] > 0 and values["tokens_per_s_b8"] > 0 and values["size_bytes"] > 0
    assert summary["arms"]["teacher"]["agreement"] == 1.0
    assert summary["arms"]["distilled"]["params"] < summary["arms"]["teacher"]["params"]
    assert len(summary["generations"]) == 2 and {"prompt", "teacher", "distilled"} <= set(summary["generations"][0])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss/ce", "loss/kd", "tokens_per_s"} <= set(next(r for r in records if r["arm"] == "distilled"))
    assert any("eval/perplexity" in r for r in records)
    # The students load with plain transformers in a Python that never imports distil.
    code = ("import sys; sys.modules['distil'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(run / 'student')!r}); "
            f"t = AutoTokenizer.from_pretrained({str(run / 'student')!r})\n"
            "print(m.config.num_hidden_layers, len(t))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "2"


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_fused_objective_equals_plain_objective(tiny_lm, divergence):
    teacher, student, _ = models(tiny_lm)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that does not count
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fused in (True, False):
        spec = LossSpec(divergence=divergence, alpha=0.7, temperature=2.0, fused=fused, chunk_size=7)
        objective = CausalLMObjective(student, Teacher(teacher), spec, vocab_size=teacher.config.vocab_size,
                                      device=CPU)
        student.zero_grad()
        terms = objective.loss(batch)
        terms["loss"].backward()
        results.append((terms, [p.grad.clone() for p in student.parameters()]))
    (fused_terms, fused_grads), (plain_terms, plain_grads) = results
    for key in ("loss", "ce", "kd"):
        torch.testing.assert_close(fused_terms[key], plain_terms[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_a_micro_batch_with_every_label_masked_gives_zero_not_nan(tiny_lm, fused):
    """A micro-batch of prompts only (every label -100) adds nothing to an accumulated step: 0, zero gradient."""
    teacher, student, _ = models(tiny_lm)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    objective = CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=0.5, fused=fused),
                                  vocab_size=teacher.config.vocab_size, device=CPU)
    student.zero_grad()
    terms = objective.loss(batch)
    terms["loss"].backward()
    assert {k: float(v.detach()) for k, v in terms.items()} == {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())


def test_accumulation_with_padded_batches_weights_by_tokens(tiny_lm, tmp_path):
    """4 x 2 accumulation equals a batch of 8 even when micro-batches hold different numbers of label tokens."""
    teacher, _, tokenizer = models(tiny_lm)
    examples = [tokenize_pair(tokenizer, "Prompt " * (i % 3 + 1), "answer words " * (i % 4 + 1), 40, False)
                for i in range(16)]
    collate = collate_pairs(examples, tokenizer.pad_token_id)
    finals = []
    for batch_size, accum in ((8, 1), (2, 4)):
        student = make_student(teacher, num_layers=2).train()
        objective = CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=0.5), vocab_size=len(tokenizer),
                                      device=CPU)
        spec = TrainSpec(steps=2, batch_size=batch_size, grad_accum=accum, optimizer="sgd", lr=0.5,
                         clip_grad_norm=None, schedule="constant", precision="fp32")  # exact sums: no bf16
        stream = BatchStream(len(examples), batch_size, collate, seed=0)
        path = tmp_path / f"{batch_size}x{accum}"
        train(Stage("a", objective, stream, spec, path, MetricsLog(path / "m.jsonl", tensorboard=False), CPU),
              show_progress=False)
        finals.append(list(student.parameters()))
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def onpolicy_objective(tiny_lm, **spec):
    teacher, student, tokenizer = models(tiny_lm)
    objective = CausalLMObjective(student, Teacher(teacher), LossSpec(divergence="jsd"), vocab_size=len(tokenizer),
                                  device=CPU, onpolicy=OnPolicySpec(**spec), pad_token_id=tokenizer.pad_token_id)
    return objective, tokenizer


def test_onpolicy_batches_are_student_samples_scored_on_the_continuation(tiny_lm):
    objective, tokenizer = onpolicy_objective(tiny_lm, lmbda=1.0, prompt_tokens=5, max_new_tokens=7)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    torch.manual_seed(3)
    [sampled] = objective.prepare([batch], step=0)
    torch.manual_seed(3)
    [again] = objective.prepare([batch], step=0)
    assert torch.equal(sampled["input_ids"], again["input_ids"])  # sampling follows the (checkpointed) torch RNG
    assert torch.equal(sampled["input_ids"][:, :5], ids[:, :5]) and (sampled["labels"][:, :5] == -100).all()
    eos = objective.student.generation_config.eos_token_id
    for row, labels, mask in zip(sampled["input_ids"], sampled["labels"], sampled["attention_mask"]):
        n = int(mask.sum())
        scored = labels[5:n]
        assert 1 <= len(scored) <= 7 and torch.equal(scored, row[5:n])  # the sampled tokens, each one scored
        assert len(scored) == 7 or int(scored[-1]) == eos  # shorter only where the student ended with EOS
        assert (labels[n:] == -100).all()
    assert objective.weight(sampled) == int((sampled["labels"][:, 1:] != -100).sum())
    terms = objective.loss(sampled)
    assert "ce" not in terms and torch.equal(terms["loss"], terms["kd"])
    off, _ = onpolicy_objective(tiny_lm, lmbda=0.0)
    assert off.prepare([batch], step=0)[0] is batch  # lmbda = 0 is plain off-policy KD


def test_onpolicy_prompts_are_the_untrained_prefix_of_each_example(tiny_lm):
    """Chat or prompt_completion rows: the prompt is everything before the first trained token, whatever its
    length, and the student's continuation replaces the reference answer."""
    from distil.data.formats import Example
    from distil.data.packing import padded_batch

    objective, tokenizer = onpolicy_objective(tiny_lm, lmbda=1.0, prompt_tokens=2, max_new_tokens=5)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, len(tokenizer), (n,), generator=g).tolist() for n in (3, 8)]
    answers = [torch.randint(5, len(tokenizer), (n,), generator=g).tolist() for n in (9, 2)]
    batch = padded_batch([Example(p + a, [-100] * len(p) + a) for p, a in zip(prompts, answers)],
                         tokenizer.pad_token_id)
    torch.manual_seed(0)
    [sampled] = objective.prepare([batch], step=0)
    for prompt, ids, labels in zip(prompts, sampled["input_ids"], sampled["labels"]):
        assert ids[: len(prompt)].tolist() == prompt and (labels[: len(prompt)] == -100).all()
        assert 1 <= int((labels != -100).sum()) <= 5


def test_onpolicy_is_decided_once_per_optimizer_step_after_the_warm_up(tiny_lm):
    objective, tokenizer = onpolicy_objective(tiny_lm, lmbda=0.5, prompt_tokens=4, max_new_tokens=3, start_step=2)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for step in (0, 1):  # the warm-up: off-policy, and no random number drawn
        assert all(b is batch for b in objective.prepare([batch] * 4, step=step))
    assert torch.equal(torch.get_rng_state(), state)
    kinds = set()
    for step in range(2, 14):
        on = [bool(b.get("onpolicy")) for b in objective.prepare([batch] * 4, step=step)]
        assert len(set(on)) == 1  # the four micro-batches of a step are all on-policy or all off-policy
        kinds.add(on[0])
    assert kinds == {True, False}  # both kinds occur (seeded; 12 steps all alike would have odds 2 * 0.5**12)
