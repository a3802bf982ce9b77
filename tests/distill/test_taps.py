import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from distil.distill.taps import Taps, first_tensor, resolve_module_names
from distil.errors import DistilError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return (None, {"h": self.lin(x), "other": x}, x * 2)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_exact_and_glob_names_capture_outputs():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 4)
    with Taps(net, ["blocks.*.0", "head"]) as taps:
        y = net(x)
    assert taps.names == ["blocks.0.0", "blocks.1.0", "blocks.2.0", "head"]
    torch.testing.assert_close(taps["head"], y)
    h0 = net.blocks[0][0](x)
    torch.testing.assert_close(taps["blocks.0.0"], h0)
    torch.testing.assert_close(taps["blocks.1.0"], net.blocks[1][0](h0.relu()))


def test_input_capture_and_hf_layers(llama):
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad(), Taps(llama, "model.layers.*") as out_taps, \
            Taps(llama, "model.layers.*.mlp", capture="input") as in_taps, \
            Taps(llama, "model.layers.*.post_attention_layernorm") as norm_taps:
        res = llama(ids, output_hidden_states=True)
    assert out_taps.names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    # decoder layer i's output is hidden_states[i + 1] (the last one is normed by the model afterwards)
    for i in range(2):
        torch.testing.assert_close(out_taps[f"model.layers.{i}"], res.hidden_states[i + 1])
    for i in range(3):
        torch.testing.assert_close(in_taps[f"model.layers.{i}.mlp"],
                                   norm_taps[f"model.layers.{i}.post_attention_layernorm"])


def test_tuple_and_dict_outputs_give_first_tensor():
    m = TupleOut()
    x = torch.randn(2, 3)
    with Taps(nn.Sequential(m), "0") as taps:
        out = m(x)
    torch.testing.assert_close(taps["0"], out[1]["h"])
    assert first_tensor((None, [1, (torch.ones(1),)])) is not None
    assert first_tensor((None, "x")) is None


def test_no_grad_keeps_no_graph_and_grad_keeps_graph(llama):
    ids = torch.randint(0, 40, (1, 5))
    with torch.no_grad(), Taps(llama, "model.layers.1.mlp") as taps:
        llama(ids)
    t = taps["model.layers.1.mlp"]
    assert not t.requires_grad and t.grad_fn is None
    with Taps(llama, "model.layers.1.mlp") as taps:
        llama(ids)
    assert taps["model.layers.1.mlp"].grad_fn is not None
    with Taps(llama, "model.layers.1.mlp", detach=True) as taps:
        llama(ids)
    assert taps["model.layers.1.mlp"].grad_fn is None


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception(llama):
    base = _hook_count(llama)  # transformers registers hooks of its own
    with Taps(llama, ["model.layers.*.mlp", "model.norm"]) as taps:
        assert _hook_count(llama) == base + 4 and taps.attached
    assert _hook_count(llama) == base and not taps.attached
    with pytest.raises(RuntimeError, match="boom"):
        with Taps(llama, "model.layers.*", capture="input"):
            assert _hook_count(llama) == base + 3
            raise RuntimeError("boom")
    assert _hook_count(llama) == base
    # an exception inside the model's forward also leaves no hook behind
    with pytest.raises(Exception):
        with Taps(llama, "model.layers.0.mlp"):
            llama(torch.randint(0, 40, (1, 5)).float())
    assert _hook_count(llama) == base


def test_glob_semantics(llama):
    assert resolve_module_names(llama, "model.layers.*") == [f"model.layers.{i}" for i in range(3)]
    assert resolve_module_names(llama, "**.mlp") == [f"model.layers.{i}.mlp" for i in range(3)]
    assert resolve_module_names(llama, "model.layers.[02].self_attn.?_proj") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in "qkvo"]
    # overlapping names are captured once, in model order
    assert resolve_module_names(llama, ["model.norm", "model.layers.1", "model.layers.*"]) == [
        "model.layers.0", "model.layers.1", "model.layers.2", "model.norm"]


def test_wrong_names_list_close_matches(llama):
    with pytest.raises(DistilError, match="model.layers.0.mlp"):
        Taps(llama, "model.layer.0.mlp")
    with pytest.raises(DistilError, match="matches no module.*model.layers.0.mlp"):
        resolve_module_names(llama, "model.layer.*.mlp")
    with pytest.raises(DistilError, match="no module names"):
        Taps(llama, [])
    with pytest.raises(DistilError, match="capture"):
        Taps(llama, "model.norm", capture="grad")


def test_reading_before_forward_or_untapped_name_is_an_error(llama):
    with Taps(llama, "model.norm") as taps:
        with pytest.raises(DistilError, match="has not run"):
            taps["model.norm"]
        with pytest.raises(DistilError, match="not tapped"):
            taps["lm_head"]
        llama(torch.randint(0, 40, (1, 3)))
        assert "model.norm" in taps and len(taps) == 1 and list(taps) == ["model.norm"]
        taps.clear()
        assert len(taps) == 0
