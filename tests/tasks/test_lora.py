"""LoRA students: only the adapters train and are checkpointed, an interrupted run resumes to the same bits, and the
saved student is a plain model with the adapters merged (the adapter alone on request)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distil.config.load import validate_recipe
from distil.distill.lm import CausalLMObjective
from distil.errors import ConfigError
from distil.runner import resume_run, run_recipe
from distil.train.checkpoint import list_checkpoints

LORA = {"r": 4, "alpha": 8.0, "save_adapter": True}


def recipe(tiny_lm, out, **changes):
    raw = {
        "name": "tiny-lora", "task": "causal_lm",
        "data": {"kind": "text", "train": ["sonnets_gut"], "eval": ["phoenix_and_the_turtle_gut"], "seq_len": 24,
                 "max_train_tokens": 1500, "eval_tokens": 96},
        "teacher": {"model": {"arch": "hf", "source": str(tiny_lm)}},
        "student": {"model": {"arch": "from_teacher", "num_layers": 2}, "lora": LORA},
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "train": {"steps": 4, "batch_size": 4, "lr": 0.01, "log_every": 1, "save_every": 2},
        "arms": ["distilled"], "output_dir": str(out), "generations_shown": 0, "latency_runs": 1,
    }
    raw.update(changes)
    return validate_recipe(raw)


class Crash(Exception):
    pass


def test_lora_student_trains_adapters_only_resumes_exactly_and_saves_merged(tiny_lm, tmp_path, monkeypatch):
    run_recipe(recipe(tiny_lm, tmp_path / "ref"), show_progress=False)
    ref = tmp_path / "ref"
    init = load_file(str(ref / "student_init" / "model.safetensors"))
    final = load_file(str(ref / "student" / "model.safetensors"))
    assert set(final) == set(init)  # a plain model: no adapter weights left in it
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    # Merging changes exactly the adapted linear layers (attention and MLP projections), never norms or embeddings.
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed)
    adapter = load_file(str(ref / "student" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    checkpoint = load_file(str(list_checkpoints(ref / "checkpoints" / "distilled")[-1] / "modules.safetensors"))
    assert checkpoint and all("lora_" in k for k in checkpoint)  # the frozen weights are not checkpointed
    AutoModelForCausalLM.from_pretrained(ref / "student")  # loads with plain transformers

    # Crash in step 4 (after the step-2 checkpoint), then resume: the same merged student, bit for bit.
    calls = {"n": 0}
    original = CausalLMObjective.loss

    def crashing(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash
        return original(self, batch)

    monkeypatch.setattr(CausalLMObjective, "loss", crashing)
    with pytest.raises(Crash):
        run_recipe(recipe(tiny_lm, tmp_path / "run"), show_progress=False)
    monkeypatch.setattr(CausalLMObjective, "loss", original)
    resume_run(tmp_path / "run", show_progress=False)
    resumed = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_lora_is_refused_where_it_does_not_apply(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="use ddp"):
        recipe(tiny_lm, tmp_path, distributed={"strategy": "fsdp"})
