import json
import pickle

import pytest
import torch
from torch import nn

from distil.train import checkpoint as ckpt


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def save(folder, step, **kw):
    model, opt = model_and_optimizer()
    return ckpt.save_checkpoint(folder, step, modules={"student": model}, optimizer=opt, state={"note": step}, **kw)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = model_and_optimizer()
    torch.manual_seed(7)
    path = ckpt.save_checkpoint(tmp_path, 5, modules={"student": model}, optimizer=opt, state={"x": 1})
    expected_draw = torch.rand(3)
    loaded = ckpt.load_latest(tmp_path)
    assert loaded.step == 5 and loaded.path == path and loaded.state["x"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.module_state("student")[k], v)
    fresh = torch.optim.AdamW(nn.Linear(4, 3).parameters(), lr=0.1)
    fresh.load_state_dict(loaded.optimizer)
    for a, b in zip(fresh.state.values(), opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    ckpt.set_rng_state(loaded.rng_tensors, loaded.state["rng"])
    assert torch.equal(torch.rand(3), expected_draw)


def test_only_the_newest_are_kept_and_no_temporary_folders_remain(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_damaged_latest_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    with open(newest / "modules.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.warns(UserWarning, match=r"modules\.safetensors is damaged"):
        loaded = ckpt.load_latest(tmp_path)
    assert loaded.step == 1


def test_unsealed_checkpoint_is_never_loaded(tmp_path):
    save(tmp_path, 1)
    partial = save(tmp_path, 2)
    (partial / ckpt.SEAL).unlink()  # as if the process died before sealing it
    with pytest.warns(UserWarning, match="COMPLETE is missing"):
        assert ckpt.load_latest(tmp_path).step == 1


def test_nothing_written_is_a_pickle(tmp_path):
    path = save(tmp_path, 1)
    for file in path.iterdir():
        with open(file, "rb") as f:
            head = f.read(2)
        assert head[:1] != b"\x80", f"{file.name} looks like a pickle"
        with pytest.raises(Exception):
            pickle.loads(file.read_bytes())
    json.loads((path / "state.json").read_text())
