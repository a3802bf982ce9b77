"""A teacher's measurement is reused only for exactly the same model files, data and settings."""

from __future__ import annotations

import os

import torch

from distil.remembered import model_files_key, remembered, tensor_key


def test_reused_for_the_same_inputs_and_measured_again_when_one_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    calls = []

    def measure():
        calls.append(1)
        return {"perplexity": 87.25 + len(calls)}, torch.tensor([[1, 2, 3]]), ["a sample"]

    what = {"model": model_files_key(model), "eval": tensor_key(torch.arange(6)), "repeats": 2}
    first = remembered(what, measure)
    again = remembered(what, measure)
    assert len(calls) == 1 and again[0]["perplexity"] == first[0]["perplexity"] == 88.25
    assert torch.equal(again[1], first[1]) and again[2] == ["a sample"] and "reused" in again[0]["measured"]

    remembered({**what, "eval": tensor_key(torch.arange(7))}, measure)  # other held-out tokens
    assert len(calls) == 2
    (model / "model.safetensors").write_bytes(b"other weights")  # the folder's contents changed
    os.utime(model / "model.safetensors", ns=(1, 1))
    remembered({**what, "model": model_files_key(model)}, measure)
    assert len(calls) == 3


def test_an_unreadable_entry_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path))
    measure = lambda: ({"x": 1.0}, torch.zeros(1), [])  # noqa: E731
    remembered({"k": 1}, measure)
    for entry in (tmp_path / "measurements").glob("*.safetensors"):
        entry.write_bytes(b"damaged")
    calls = []
    remembered({"k": 1}, lambda: calls.append(1) or measure())
    assert calls == [1]
