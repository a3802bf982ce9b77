"""The fused LM-head path serves only models whose logits are ``hidden @ lm_head.weight.T``; the others get the plain
path (with one notice) instead of silently wrong values: Granite's logits_scaling=8 made the fused KD term 64x off."""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

from distil.config.schema import LossSpec
from distil.distill.lm import CausalLMObjective, fused_problem
from distil.distill.pair import Teacher

CPU = torch.device("cpu")
SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def granite(seed: int) -> GraniteForCausalLM:
    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(**SIZES, logits_scaling=8.0)).eval()


def llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()


def scaled_head(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A post-processed head that no config key names: the numeric check must see it."""
    model.lm_head.register_forward_hook(lambda module, args, out: out * 0.25)
    return model


def batch():
    ids = torch.randint(0, SIZES["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def terms(student, teacher, fused: bool):
    objective = CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=0.5, temperature=2.0, fused=fused),
                                  vocab_size=SIZES["vocab_size"], device=CPU)
    return objective, {k: float(v.detach()) for k, v in objective.loss(batch()).items()}


@pytest.mark.parametrize("make", [granite, lambda seed: scaled_head(llama(seed))], ids=["granite", "hooked-head"])
def test_a_rescaled_head_takes_the_plain_path_with_a_notice(make, capsys):
    student, teacher = make(1), make(2)
    objective, fused = terms(student, teacher, fused=True)
    assert objective.fused is False
    assert "the LM losses take the plain path" in capsys.readouterr().err
    _, plain = terms(student, teacher, fused=False)
    assert fused == pytest.approx(plain, rel=1e-6)


def test_a_plain_head_keeps_the_fused_path():
    objective, _ = terms(llama(1), llama(2), fused=True)
    assert objective.fused is True


def test_the_check_names_the_model_and_why():
    ids = batch()["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert "logits_scaling=8.0" in fused_problem(granite(0), "teacher", inputs)
    assert "not hidden @ lm_head.weight.T" in fused_problem(scaled_head(llama(0)), "student", inputs)
    assert fused_problem(llama(0), "student", inputs) is None


def test_the_check_leaves_training_mode_and_rng_as_they_were():
    model = llama(0).train()
    ids = batch()["input_ids"]
    state = torch.get_rng_state()
    fused_problem(model, "student", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert model.training and torch.equal(torch.get_rng_state(), state)
