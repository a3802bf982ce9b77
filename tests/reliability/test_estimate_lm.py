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


def test_a_padding_id_beyond_the_traced_vocabulary_is_fine():
    """Qwen2.5's pad id (151,643) lies outside the 64-row vocabulary the trace uses: the trace must not keep it."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=999)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.zeros((2, 16), dtype=torch.long)
    real = trace_saved(lambda: model.base_model(input_ids=ids, use_cache=False), exclude=list(model.parameters()))[0]
    assert _activation_bytes(config, 2, 16) == real


def test_a_lora_student_counts_gradients_and_optimizer_state_of_its_adapters_only(tiny_lm):
    from distil.models.lora import Lora, with_lora

    raw = lm_recipe(tiny_lm).model_dump()
    raw["student"]["lora"] = {"r": 4, "alpha": 8}
    items = {i.name: i.bytes for i in estimate_memory(validate_recipe(raw)).stages[-1].items}
    from distil.students import make_student

    student = make_student(AutoModelForCausalLM.from_pretrained(tiny_lm), num_layers=2)  # the recipe's student
    adapters = with_lora(student, Lora(r=4, alpha=8))
    trained = sum(p.numel() * 4 for p in adapters.parameters() if p.requires_grad)
    assert items["gradients"] == trained and items["optimizer state"] == 2 * trained


def test_a_teacher_stage_is_a_stage_of_its_own_training_the_teacher(tiny_lm):
    from distil.models.lora import Lora, with_lora

    raw = lm_recipe(tiny_lm).model_dump()
    raw["teacher"]["train"] = {"steps": 2, "batch_size": 3}
    raw["teacher"]["lora"] = {"r": 4, "alpha": 8}
    stages = estimate_memory(validate_recipe(raw)).stages
    assert [s.name for s in stages] == ["teacher", "student_alone", "distilled"]
    items = {i.name: i.bytes for i in stages[0].items}
    adapters = with_lora(AutoModelForCausalLM.from_pretrained(tiny_lm), Lora(r=4, alpha=8))
    assert items["weights"] == parameter_bytes(adapters)  # parameters (adapters included) and buffers
    trained = sum(p.numel() * 4 for p in adapters.parameters() if p.requires_grad)
    assert items["gradients"] == trained and items["optimizer state"] == 2 * trained
    assert items["activations"] == _activation_bytes(AutoConfig.from_pretrained(tiny_lm), 3, 32)
