"""What an online distillation step costs against its parts: the flagship's fp32 step on this CPU.

SmolLM2-135M-Instruct teacher, the 10-layer student built from it (frozen embeddings: the tied LM head does not
train), batches of 8 x 64 tokens of Shakespeare, fp32, fused AdamW. Measured in one process, interleaved round by
round so that machine noise hits every kind alike; medians and ratios are reported:
- `ce`: the student trained alone (fused cross-entropy), forward + backward + optimizer step;
- `teacher_forward`: the teacher's forward to its final hidden states, no grad (what the KD step adds at least);
- `teacher_forward_logits`: the teacher's whole forward, LM head included (a teacher's forward pass as a user times
  it);
- `kd_two_passes`: the KD step as it was: fused CE and fused divergence as two passes over the LM head;
- `kd_one_pass`: the KD step with `fused_linear_kd_and_ce` (one pass over each chunk for both terms).

    python benchmarks/lm_step.py --rounds 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date

import torch

from distil.config.load import load_recipe
from distil.data.sources.text import lm_batch, load_corpus
from distil.distill.lm import CausalLMObjective, final_hidden
from distil.distill.pair import Teacher
from distil.losses import fused_linear_cross_entropy, fused_linear_divergence
from distil.measure.machine import cpu_model
from distil.models import hf
from distil.students import make_student
from distil.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    hf.quiet_transformers()
    recipe = load_recipe("smollm2-distil", ["train.precision=fp32", "data.max_train_tokens=20000"])
    teacher, tokenizer = hf.load_causal_lm(recipe.teacher.model.source, dtype="float32")
    teacher.eval()
    student = make_student(teacher, num_layers=10).train()
    for head in (student.get_input_embeddings(), student.get_output_embeddings()):
        head.weight.requires_grad_(False)
    corpus = load_corpus(recipe.data, tokenizer)
    cpu, vocab, spec = torch.device("cpu"), teacher.config.vocab_size, recipe.loss
    alone = CausalLMObjective(student, None, spec, vocab_size=vocab, device=cpu)
    one_pass = CausalLMObjective(student, Teacher(teacher), spec, vocab_size=vocab, device=cpu)
    optimizer = build_optimizer(recipe.train, [p for p in student.parameters() if p.requires_grad])

    def two_passes(batch: dict) -> dict:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        weight = student.get_output_embeddings().weight
        hidden = final_hidden(student, {"input_ids": ids, "attention_mask": mask})[:, :-1]
        with torch.no_grad():
            t_hidden = final_hidden(teacher, {"input_ids": ids, "attention_mask": mask})[:, :-1]
        ce = fused_linear_cross_entropy(hidden, weight, targets)
        kd = fused_linear_divergence(hidden, weight, t_hidden, teacher.get_output_embeddings().weight,
                                     temperature=spec.temperature, mask=keep)
        return {"loss": spec.alpha * kd + (1 - spec.alpha) * ce}

    def step(loss_of, batch) -> None:
        loss_of(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward(batch) -> None:
        with torch.no_grad():
            final_hidden(teacher, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})

    def teacher_forward_logits(batch) -> None:
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    kinds = {"ce": lambda b: step(alone.loss, b), "teacher_forward": teacher_forward,
             "teacher_forward_logits": teacher_forward_logits,
             "kd_two_passes": lambda b: step(two_passes, b), "kd_one_pass": lambda b: step(one_pass.loss, b)}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for r in range(args.rounds + 1):
        batch = lm_batch(corpus.train[8 * r: 8 * r + 8])
        for name, run in kinds.items():
            begin = time.perf_counter()
            run(batch)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - begin)
    med = {name: statistics.median(t) for name, t in times.items()}
    ideal = med["ce"] + med["teacher_forward"]
    print(json.dumps({
        "date": str(date.today()), "cpu": cpu_model(), "threads": torch.get_num_threads(), "rounds": args.rounds,
        "median_s": med, "ratio_to_ce": {k: v / med["ce"] for k, v in med.items()},
        "kd_one_pass_over_ce_plus_teacher_forward": med["kd_one_pass"] / ideal,
        "kd_two_passes_over_ce_plus_teacher_forward": med["kd_two_passes"] / ideal,
        "kd_one_pass_over_ce_plus_teacher_forward_logits": med["kd_one_pass"] / (med["ce"] + med["teacher_forward_logits"]),
        "tokens_per_s": {k: 512 / v for k, v in med.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
