"""distil export: ONNX graphs that onnxruntime runs with PyTorch's outputs, int8 copies measured, Hugging Face
folders that load without distil, safetensors that rebuild the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distil.cli import main
from distil.errors import DistilError
from distil.export import export_run
from distil.measure.exported import classifier_eval_data, lm_batches, lm_scores
from distil.models.vision import load_classifier

from lm_run import SENTENCES, TEXT

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install 'distil[export]')")


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A copy of the run directory, so that exports here do not change what the report tests read."""
    return shutil.copytree(digits_run, tmp_path / "run")


@pytest.fixture
def lm_copy(lm_run, tmp_path):
    return shutil.copytree(lm_run, tmp_path / "run")


def onnx_vs_torch(onnx_path, model, x):
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in sess.get_inputs()]
    with torch.no_grad():
        return float(np.abs(sess.run(None, {name: x.numpy()})[0] - model(x).numpy()).max())


def test_onnx_export_of_the_mlp_student_matches_pytorch_and_int8_is_measured(run_copy):
    record = export_run(run_copy, "onnx", quantize="int8", runs=3)
    assert record["check"]["passed"] and record["check"]["max_abs_diff"] <= 1e-4
    assert "test-set images" in record["check"]["inputs"]
    # Independently of the exporter's own check: a fresh session, batch sizes other than the traced one.
    model = load_classifier(run_copy / "student")
    x, y, _ = classifier_eval_data(run_copy)
    onnx_file = run_copy / "export" / "distilled-onnx" / "model.onnx"
    for batch in (1, 37, len(x)):
        assert onnx_vs_torch(onnx_file, model, x[:batch]) <= 1e-4
    rows = record["measurements"]
    assert list(rows) == ["teacher (PyTorch)", "distilled (PyTorch)", "distilled ONNX fp32", "distilled ONNX int8"]
    summary = json.loads((run_copy / "summary.json").read_text())
    assert rows["distilled (PyTorch)"]["accuracy"] == pytest.approx(summary["arms"]["distilled"]["accuracy"])
    assert rows["distilled ONNX fp32"]["accuracy"] == pytest.approx(rows["distilled (PyTorch)"]["accuracy"])
    int8 = rows["distilled ONNX int8"]
    assert int8["size_bytes"] == (run_copy / "export" / "distilled-onnx" / "model.int8.onnx").stat().st_size
    assert int8["size_bytes"] < rows["distilled ONNX fp32"]["size_bytes"]
    assert abs(int8["accuracy"] - rows["distilled ONNX fp32"]["accuracy"]) <= 0.05
    assert int8["latency_ms"] > 0 and int8["samples_per_s_b256"] > 0
    # Written beside the run and shown in the rebuilt report.
    saved = json.loads((run_copy / "export.json").read_text())["exports"]
    assert [(r["arm"], r["format"], r["quantize"]) for r in saved] == [("distilled", "onnx", "int8")]
    page = (run_copy / "report.html").read_text()
    assert '<section id="export">' in page and "distilled ONNX int8" in page
    assert (run_copy / "report" / "export_distilled_onnx.png").is_file()


def test_onnx_export_of_the_cnn_teacher_matches_pytorch(run_copy):
    record = export_run(run_copy, "onnx", arm="teacher", runs=3, out=run_copy / "cnn")
    assert record["check"]["passed"]
    summary = json.loads((run_copy / "summary.json").read_text())
    model = load_classifier(summary["arms"]["teacher"]["path"])
    assert type(model).__name__ == "CNN"
    x, _, _ = classifier_eval_data(run_copy)
    for batch in (1, 64):
        assert onnx_vs_torch(run_copy / "cnn" / "model.onnx", model, x[:batch]) <= 1e-4
    assert "teacher ONNX fp32" in record["measurements"] and "teacher ONNX int8" not in record["measurements"]


def test_safetensors_export_rebuilds_the_same_classifier(run_copy):
    assert main(["export", str(run_copy), "--format", "safetensors", "-o", str(run_copy / "st")]) == 0
    assert sorted(p.name for p in (run_copy / "st").iterdir()) == ["config.json", "model.safetensors"]
    x, _, _ = classifier_eval_data(run_copy)
    with torch.no_grad():
        assert torch.equal(load_classifier(run_copy / "st")(x), load_classifier(run_copy / "student")(x))


def test_export_refuses_bad_requests_with_one_clear_line(run_copy, capsys):
    with pytest.raises(DistilError, match="Hugging Face student"):
        export_run(run_copy, "hf")
    with pytest.raises(DistilError, match="onnx only"):
        export_run(run_copy, "safetensors", quantize="int8")
    with pytest.raises(DistilError, match="teacher, student_alone, distilled"):
        export_run(run_copy, "onnx", arm="student")
    assert main(["export", str(run_copy), "--format", "hf"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_onnx_export_of_a_tiny_llama_has_dynamic_axes_and_a_measured_int8_copy(lm_copy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = export_run(lm_copy, "onnx", quantize="int8", runs=2)
    assert record["check"]["passed"] and record["check"]["max_abs_diff"] <= 1e-4
    assert "held-out tokens of" in record["check"]["inputs"] and "eval.txt" in record["check"]["inputs"]
    out = lm_copy / "export" / "distilled-onnx"
    model = AutoModelForCausalLM.from_pretrained(lm_copy / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(out)  # the graph ships with the tokenizer that makes its inputs
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    # Real text at batch sizes and lengths other than the traced example's, with padding.
    for texts in (SENTENCES[:3], SENTENCES[3:4], [TEXT]):
        enc = tokenizer(texts, padding=True, return_tensors="np")
        got = sess.run(None, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(enc["input_ids"]),
                         attention_mask=torch.from_numpy(enc["attention_mask"]), use_cache=False).logits.numpy()
        keep = enc["attention_mask"].astype(bool)
        assert got.shape == want.shape and np.abs(got - want)[keep].max() <= 1e-4
    rows = record["measurements"]
    assert list(rows) == ["teacher (PyTorch)", "distilled (PyTorch)", "distilled ONNX fp32", "distilled ONNX int8"]
    fp32, int8 = rows["distilled ONNX fp32"], rows["distilled ONNX int8"]
    assert fp32["perplexity"] == pytest.approx(rows["distilled (PyTorch)"]["perplexity"], rel=1e-5)
    assert rows["teacher (PyTorch)"]["agreement"] == 1.0 and 0 <= int8["agreement"] <= 1
    assert np.isfinite(int8["perplexity"]) and int8["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.05)
    assert int8["size_bytes"] < fp32["size_bytes"]
    (speed,) = [v for k, v in int8.items() if k.startswith("tokens_per_s_b")]  # batch: the held-out blocks, up to 8
    assert speed > 0
    page = (lm_copy / "report.html").read_text()
    assert "distilled ONNX int8" in page and "perplexity" in page


def test_lm_scores_match_a_hand_computed_perplexity():
    from lm_run import tiny_llama, word_tokenizer

    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), layers=1, seed=3)
    batches = lm_batches(tokenizer, SENTENCES[:3], batch_size=2)
    run = lambda b: model(**b).logits  # noqa: E731
    nll, count = 0.0, 0
    for text in SENTENCES[:3]:  # one unpadded text at a time: no mask involved
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    with torch.no_grad():
        scores = lm_scores(run, batches, [run(b) for b in batches])
    assert scores["perplexity"] == pytest.approx(float(np.exp(nll / count)), rel=1e-5)
    assert scores["agreement"] == 1.0


CLEAN_LOAD = textwrap.dedent("""
    import importlib.abc, json, sys
    class NoDistil(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "distil" or name.startswith("distil."):
                raise ImportError("distil must not be needed to load an exported model")
    sys.meta_path.insert(0, NoDistil())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, text = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert not any(m == "distil" or m.startswith("distil.") for m in sys.modules)
    print(json.dumps({"ids": ids[0].tolist(), "logits": logits[0].tolist()}))
""")


def test_hf_export_loads_in_a_python_that_never_imports_distil(lm_copy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = lm_copy / "student"
    (student / "train.json").write_text("{}")  # training-only files beside the weights must not be exported
    (student / "projectors.safetensors").write_bytes(b"not a model file")
    record = export_run(lm_copy, "hf", out=tmp_path / "hf")
    names = set(record["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"train.json", "projectors.safetensors"} and record["tokenizer"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    result = subprocess.run([sys.executable, "-I", "-c", CLEAN_LOAD, str(tmp_path / "hf"), SENTENCES[0]],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(student)
    ids = tokenizer(SENTENCES[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(student).eval()(input_ids=ids).logits[0]
    assert loaded["ids"] == ids[0].tolist()
    assert torch.allclose(torch.tensor(loaded["logits"]), want, atol=1e-6)
