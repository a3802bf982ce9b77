"""distil.distill(): Hugging Face `datasets.Dataset` rows, exact resume after a Ctrl-C, and the run lock."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

import distil
from distil import runlock
from distil.errors import DistilError
from distil.train.checkpoint import load_tensors
from distil.train.signals import StopRequested

datasets = pytest.importorskip("datasets", reason="pip install datasets (part of distil[llm])")


def classifiers() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    return teacher, student


def rows(n: int = 48) -> dict[str, list]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return {"input": x.tolist(), "label": (x[:, 0] > 0).long().add(x[:, 1] > 0).tolist()}


class CtrlCAt(torch.utils.data.Dataset):
    """The rows of `data`; its `at`-th read sends this process SIGINT, as a user's Ctrl-C would."""

    def __init__(self, data, at: int):
        self.data, self.at, self.reads = data, at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.data[i]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "student" / "model.safetensors")


def test_a_hugging_face_dataset_trains_a_classifier(tmp_path):
    teacher, student = classifiers()
    data = datasets.Dataset.from_dict(rows())
    result = distil.distill(teacher, student, data, eval_data=data.select(range(16)), steps=4, batch_size=8,
                            lr=1e-2, output_dir=tmp_path / "run", report=False)
    arms = result.summary["arms"]
    assert set(arms) == {"teacher", "distilled"} and 0.0 <= arms["distilled"]["accuracy"] <= 1.0
    assert (result.run_dir / "student" / "model.safetensors").is_file()


def test_a_hugging_face_text_dataset_trains_a_causal_lm(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    student = distil.make_student(teacher, num_layers=1)
    texts = datasets.Dataset.from_dict({"text": ["to be or not to be", "that is the question", "whether tis nobler",
                                                 "in the mind to suffer"] * 2})
    result = distil.distill(teacher, student, texts, tokenizer=tokenizer, steps=2, batch_size=4, max_length=16,
                            output_dir=tmp_path / "lm", report=False)
    row = result.summary["arms"]["distilled"]
    assert row["perplexity"] > 1.0 and 0.0 <= row["agreement"] <= 1.0


def test_a_ctrl_c_then_the_same_call_ends_where_an_uninterrupted_run_does(tmp_path):
    data = datasets.Dataset.from_dict(rows())
    kwargs = dict(steps=6, batch_size=8, lr=1e-2, save_every=2, report=False)

    teacher, student = classifiers()
    whole = distil.distill(teacher, student, data, output_dir=tmp_path / "whole", **kwargs)

    # The SIGINT lands while a batch of step 3 is read: the loop finishes its step, saves, and stops.
    teacher, student = classifiers()
    interrupted = tmp_path / "interrupted"
    with pytest.raises(StopRequested) as stop:
        distil.distill(teacher, student, CtrlCAt(data, at=2 * 8 + 1), output_dir=interrupted, **kwargs)
    assert 3 <= stop.value.step < 6 and not (interrupted / "student").exists()

    teacher, student = classifiers()  # a fresh process would rebuild its models the same way
    counted = CtrlCAt(data, at=-1)
    resumed = distil.distill(teacher, student, counted, output_dir=interrupted, **kwargs)
    # It went on from the checkpoint: only the remaining steps' rows were read (then the 48 evaluation rows).
    assert counted.reads == (6 - stop.value.step) * 8 + 48
    a, b = weights(whole.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["arms"]["distilled"]["accuracy"] == whole.summary["arms"]["distilled"]["accuracy"]


def test_a_second_call_on_a_folder_in_use_is_refused(tmp_path):
    teacher, student = classifiers()
    folder = tmp_path / "busy"
    folder.mkdir()
    runlock.acquire(folder)  # as a run still going in this folder holds it
    try:
        with pytest.raises(DistilError, match="in use"):
            distil.distill(teacher, student, datasets.Dataset.from_dict(rows()), steps=2, output_dir=folder)
    finally:
        runlock.release(folder)
    assert not (folder / "metrics.jsonl").exists()
