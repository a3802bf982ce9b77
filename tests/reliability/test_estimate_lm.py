"""The causal-LM memory estimate: its parts against real models of the same configs."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distil.config.load import validate_recipe
from distil.estimate import estimate_memory, parameter_bytes, trace_saved
from distil.tasks.causal_lm_estimate import _activation_bytes


def lm_recipe(tiny_lm, **loss):
    return validate_recipe({
        "name": "tiny", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 32},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}, "freeze_embeddings": True},
        "loss": loss, "train": {"steps": 2, "batch_size": 4},
    })


def test_traced_activations_equal_those_of_the_full_model(tiny_lm):
    config = AutoConfig.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.zeros((3, 24), dtype=torch.long)
    real = trace_saved(lambda: model.base_model(input_ids=ids, use_cache=False), exclude=list(model.parameters()))[0]
    assert _activation_bytes(config, 3, 24) == real


def test_weights_gradients_and_optimizer_follow_the_student(tiny_lm):
    estimate = estimate_memory(lm_recipe(tiny_lm))
    items = {item.name: item.bytes for item in estimate.peak.items}
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert items["teacher weights"] == parameter_bytes(teacher) - sum(b.numel() * 4 for b in teacher.buffers())
    from distil.students import make_student

    student = make_student(teacher, num_layers=2)
    student.get_input_embeddings().weight.requires_grad_(False)
    trainable = parameter_bytes(student, trainable=True)
    assert items["gradients"] == trainable and items["optimizer state"] == 2 * trainable
    assert estimate.peak.name == "distilled"  # the arm that also holds the teacher


def test_the_fused_path_needs_fewer_loss_buffers_at_long_sequences(tiny_lm):
    fused = {i.name: i.bytes for i in estimate_memory(lm_recipe(tiny_lm, chunk_size=8)).peak.items}
    plain = {i.name: i.bytes for i in estimate_memory(lm_recipe(tiny_lm, fused=False)).peak.items}
    assert fused["logits and loss buffers"] * 10 < plain["logits and loss buffers"]
