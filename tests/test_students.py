"""make_student: copied layers reproduce the teacher, width reduction keeps slices, GQA stays valid, saves cleanly."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from distil.errors import DistilError
from distil.students import choose_layers, make_student, parse_layers, plan_student, save_student

VOCAB = 64


def tiny_llama(tie: bool = False, layers: int = 4, seed: int = 0, cls=LlamaForCausalLM, config_cls=LlamaConfig):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
                        max_position_embeddings=64)
    return cls(config).eval()


def tiny_bert(cls=BertForMaskedLM, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return cls(config).eval()


def tokens(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def layer_stack(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def first(out):
    return out[0] if isinstance(out, tuple) else out


def layer_io(model, input_ids, replace: dict[int, torch.Tensor] | None = None):
    """Inputs and outputs of every layer; ``replace`` feeds chosen layers a given input instead of their own."""
    inputs, outputs, handles = {}, {}, []
    for n, layer in enumerate(layer_stack(model)):
        def pre(module, args, kwargs, n=n):
            if replace is not None and n in replace:
                args = (replace[n],) + tuple(args[1:])
            inputs[n] = args[0]
            return args, kwargs

        def post(module, args, output, n=n):
            outputs[n] = first(output)

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


@pytest.mark.parametrize("make", [lambda: tiny_llama(tie=False), lambda: tiny_llama(tie=True),
                                  lambda: tiny_bert(BertModel)])
def test_copied_layers_reproduce_teacher_activations(make):
    teacher = make()
    layers = [0, 2, 3]
    student = make_student(teacher, layers=layers)
    assert student.config.num_hidden_layers == 3 and type(student) is type(teacher)
    x = tokens()
    t_in, t_out = layer_io(teacher, x)
    # Student layer j fed the teacher's input to layer layers[j] gives exactly that layer's output.
    s_in, s_out = layer_io(student, x, replace={j: t_in[i] for j, i in enumerate(layers)})
    for j, i in enumerate(layers):
        torch.testing.assert_close(s_out[j], t_out[i], rtol=0, atol=0)
    # Embeddings feed the first layer: identical without any replacement.
    s_in0, _ = layer_io(student, x)
    torch.testing.assert_close(s_in0[0], t_in[0], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: tiny_llama(tie=True), lambda: tiny_llama(tie=False), tiny_bert,
                                  lambda: tiny_bert(BertForSequenceClassification)])
def test_full_size_student_equals_teacher(make):
    teacher = make()
    g = teacher.config
    student = make_student(teacher, hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
                           num_attention_heads=g.num_attention_heads)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=x).logits, teacher(input_ids=x).logits, rtol=0, atol=0)
    teacher_memory = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in teacher_memory for p in student.parameters())  # training one leaves the other


def test_num_layers_spreads_evenly_keeping_first_and_last():
    assert choose_layers(30, num_layers=10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert choose_layers(12, num_layers=6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    for n_teacher in range(1, 41):
        for n in range(2, n_teacher + 1):
            chosen = choose_layers(n_teacher, num_layers=n)
            assert len(chosen) == n and chosen[0] == 0 and chosen[-1] == n_teacher - 1
            assert all(b > a for a, b in zip(chosen, chosen[1:]))
    teacher = tiny_llama(layers=5)
    assert make_student(teacher, num_layers=3).config.num_hidden_layers == 3
    torch.testing.assert_close(make_student(teacher, num_layers=3).model.layers[2].mlp.up_proj.weight,
                               teacher.model.layers[4].mlp.up_proj.weight, rtol=0, atol=0)


def head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads.tolist()])


@pytest.mark.parametrize("tie", [False, True])
def test_width_reduced_llama_keeps_slices_of_teacher(tie):
    teacher = tiny_llama(tie=tie)
    plan = plan_student(teacher, layers=[1, 3], hidden_size=20, intermediate_size=24, num_attention_heads=2,
                        num_key_value_heads=1)
    student = make_student(teacher, layers=[1, 3], hidden_size=20, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=1)
    c = student.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        20, 24, 2, 1, 8)
    h = plan.hidden
    assert len(h) == 20 and len(set(h.tolist())) == 20
    eq = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)  # noqa: E731
    eq(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, h])
    eq(student.lm_head.weight, teacher.lm_head.weight[:, h])
    eq(student.model.norm.weight, teacher.model.norm.weight[h])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    for j, i in enumerate(plan.layers):
        s, t = student.model.layers[j], teacher.model.layers[i]
        q, kv, n = head_rows(plan.heads[j], 8), head_rows(plan.kv_heads[j], 8), plan.neurons[j]
        eq(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[q][:, h])
        eq(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[kv][:, h])
        eq(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[kv][:, h])
        eq(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[h][:, q])
        eq(s.mlp.gate_proj.weight, t.mlp.gate_proj.weight[n][:, h])
        eq(s.mlp.up_proj.weight, t.mlp.up_proj.weight[n][:, h])
        eq(s.mlp.down_proj.weight, t.mlp.down_proj.weight[h][:, n])
        eq(s.input_layernorm.weight, t.input_layernorm.weight[h])
        eq(s.post_attention_layernorm.weight, t.post_attention_layernorm.weight[h])
    assert torch.isfinite(student(input_ids=tokens()).logits).all()


def test_width_reduced_bert_keeps_slices_and_heads_follow_hidden():
    teacher = tiny_bert()
    plan = plan_student(teacher, hidden_size=16, intermediate_size=20)
    student = make_student(teacher, hidden_size=16, intermediate_size=20)
    assert student.config.num_attention_heads == 2  # head size 8 is kept: 16 / 8
    h, eq = plan.hidden, (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0))
    eq(student.bert.embeddings.position_embeddings.weight, teacher.bert.embeddings.position_embeddings.weight[:, h])
    eq(student.cls.predictions.transform.dense.weight, teacher.cls.predictions.transform.dense.weight[h][:, h])
    eq(student.cls.predictions.decoder.weight, teacher.bert.embeddings.word_embeddings.weight[:, h])
    q = head_rows(plan.heads[0], 8)
    eq(student.bert.encoder.layer[0].attention.self.key.bias, teacher.bert.encoder.layer[0].attention.self.key.bias[q])
    eq(student.bert.encoder.layer[0].output.dense.weight,
       teacher.bert.encoder.layer[0].output.dense.weight[h][:, plan.neurons[0]])


def test_dropping_heads_and_neurons_equals_teacher_with_them_zeroed():
    """Functional check of head/neuron pruning and the GQA pairing: with the hidden size kept, a student without
    some heads/neurons computes exactly what the teacher computes with those heads' and neurons' outputs zeroed."""
    teacher = tiny_llama(layers=2)
    kwargs = dict(num_attention_heads=2, num_key_value_heads=2, intermediate_size=25)  # 1 of 2 heads per group
    plan = plan_student(teacher, **kwargs)
    student = make_student(teacher, **kwargs)
    masked = copy.deepcopy(teacher)
    for j, layer in enumerate(masked.model.layers):
        keep_q = torch.zeros(32, dtype=torch.bool)
        keep_q[head_rows(plan.heads[j], 8)] = True
        keep_n = torch.zeros(40, dtype=torch.bool)
        keep_n[plan.neurons[j]] = True
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, ~keep_q] = 0
            layer.mlp.down_proj.weight[:, ~keep_n] = 0
        # each kept query head sits in a kept KV group (head h uses KV head h // 2 in the teacher)
        assert set((plan.heads[j] // 2).tolist()) == set(plan.kv_heads[j].tolist())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=x).logits, masked(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_stays_valid():
    teacher = tiny_llama()  # 4 heads in 2 KV groups of 2
    s = make_student(teacher, num_attention_heads=2)  # KV heads default to the teacher's 2 -> groups of 1
    assert (s.config.num_attention_heads, s.config.num_key_value_heads) == (2, 2)
    s = make_student(teacher, num_attention_heads=2, num_key_value_heads=1)
    assert (s.config.num_attention_heads, s.config.num_key_value_heads) == (2, 1)
    out = s.generate(tokens(shape=(1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    with pytest.raises(DistilError, match="num_key_value_heads can be 2"):
        make_student(teacher, num_attention_heads=4, num_key_value_heads=1)  # 4 heads on 1 KV head: groups of 4 > 2
    with pytest.raises(DistilError, match="grouped-query"):
        make_student(teacher, num_attention_heads=3)
    qwen = tiny_llama(cls=Qwen2ForCausalLM, config_cls=Qwen2Config)
    s = make_student(qwen, num_layers=3, hidden_size=24, num_attention_heads=2, num_key_value_heads=1)
    assert s.config.layer_types == ["full_attention"] * 3
    assert torch.isfinite(s(input_ids=tokens()).logits).all()


def test_magnitude_ranking_keeps_the_largest_channel_head_and_neuron():
    teacher = tiny_llama(layers=2)
    layer = teacher.model.layers[1]
    with torch.no_grad():  # make hidden channel 7, query head 3 (KV group 1) and neuron 11 of layer 1 the largest
        teacher.model.embed_tokens.weight[:, 7] *= 50
        layer.self_attn.q_proj.weight[24:32] *= 50
        layer.self_attn.o_proj.weight[:, 24:32] *= 50
        layer.mlp.up_proj.weight[11] *= 50
    plan = plan_student(teacher, hidden_size=4, num_attention_heads=1, num_key_value_heads=1, intermediate_size=1)
    assert 7 in plan.hidden.tolist()
    assert plan.heads[1].tolist() == [3] and plan.kv_heads[1].tolist() == [1]
    assert plan.neurons[1].tolist() == [11]


def test_calibration_ranks_by_activation_not_weight_size():
    teacher = tiny_llama(layers=2)
    with torch.no_grad():  # neuron 5 of layer 0: huge weights, but up_proj gives it zero activation on every input
        teacher.model.layers[0].mlp.gate_proj.weight[5] *= 100
        teacher.model.layers[0].mlp.down_proj.weight[:, 5] *= 100
        teacher.model.layers[0].mlp.up_proj.weight[5] = 0
    batches = [{"input_ids": tokens(seed), "attention_mask": torch.ones(2, 9, dtype=torch.long)} for seed in (1, 2)]
    by_weight = plan_student(teacher, intermediate_size=39)
    by_activation = plan_student(teacher, intermediate_size=39, calibration=batches)
    assert 5 in by_weight.neurons[0].tolist()
    assert 5 not in by_activation.neurons[0].tolist()
    with pytest.raises(DistilError, match="no batches"):
        plan_student(teacher, intermediate_size=39, calibration=[])


def test_calibration_ignores_padding_positions():
    teacher = tiny_bert(BertModel, layers=1)
    x = tokens(shape=(1, 9))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0]])
    padded = plan_student(teacher, intermediate_size=20, calibration=[{"input_ids": x, "attention_mask": mask}])
    # BERT without a mask would attend everywhere; compare with the same masked forward but where the padded
    # positions carry different tokens: the ranking must not change.
    x2 = x.clone()
    x2[0, 4:] = (x2[0, 4:] + 7) % VOCAB
    padded2 = plan_student(teacher, intermediate_size=20, calibration=[{"input_ids": x2, "attention_mask": mask}])
    assert padded.neurons[0].tolist() == padded2.neurons[0].tolist()


def test_invalid_requests_raise_clear_errors():
    teacher = tiny_llama()
    cases = [
        (dict(layers=[0, 4]), "out of range"),
        (dict(num_layers=5), "between 1 and the teacher's 4"),
        (dict(layers=[2, 1]), "strictly increasing"),
        (dict(layers=[0], num_layers=1), "not both"),
        (dict(hidden_size=33), "hidden_size=33"),
        (dict(intermediate_size=0), "intermediate_size=0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DistilError, match=message):
            make_student(teacher, **kwargs)
    with pytest.raises(DistilError, match="multiple of the head size 8"):
        make_student(tiny_bert(), hidden_size=20)
    with pytest.raises(DistilError, match="one key/value head per attention head"):
        make_student(tiny_bert(), num_attention_heads=2, num_key_value_heads=1)
    assert parse_layers("0, 2,4") == [0, 2, 4]
    with pytest.raises(DistilError, match="comma-separated"):
        parse_layers("0;2")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(DistilError, match="model_type 'gpt2'"):
        make_student(gpt2, num_layers=1)


LOAD_WITHOUT_DISTIL = """
import sys
sys.modules["distil"] = None  # any import of distil, direct or indirect, now fails
import json, torch, transformers
results = []
for folder, cls in json.loads(sys.argv[2]):
    model = getattr(transformers, cls).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(json.loads(sys.argv[1])))
    values = out.logits if hasattr(out, "logits") else out.last_hidden_state
    results.append({"class": type(model).__name__, "values": values.flatten().tolist()})
assert sys.modules["distil"] is None
print(json.dumps(results))
"""


def load_in_clean_python(ids: torch.Tensor, *folders_and_classes: tuple[Path, str]) -> list[dict]:
    """Load saved models in a fresh Python that cannot import distil; their outputs on ``ids``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    jobs = json.dumps([[str(folder), cls] for folder, cls in folders_and_classes])
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DISTIL, json.dumps(ids.tolist()), jobs],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_students_save_and_load_without_distil(tmp_path):
    students = {"AutoModelForCausalLM": tiny_llama(tie=True), "AutoModel": tiny_bert(BertModel)}
    students = {cls: make_student(t, num_layers=2, hidden_size=16, intermediate_size=20, num_attention_heads=2)
                for cls, t in students.items()}
    for cls, student in students.items():
        student.save_pretrained(tmp_path / cls)
    x = tokens()
    loaded = load_in_clean_python(x, *[(tmp_path / cls, cls) for cls in students])
    for got, student in zip(loaded, students.values()):
        assert got["class"] == type(student).__name__
        with torch.no_grad():
            out = student(input_ids=x)
        expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
        torch.testing.assert_close(torch.tensor(got["values"]).view_as(expected), expected, rtol=1e-5, atol=1e-5)


def test_save_student_saves_student_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    teacher_dir = tmp_path / "teacher"
    tiny_llama(tie=True).save_pretrained(teacher_dir)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1").save_pretrained(teacher_dir)
    out = tmp_path / "student"
    result = save_student(str(teacher_dir), out, num_layers=2, intermediate_size=20)
    assert result["layers"] == [0, 3]
    assert result["teacher"]["num_layers"] == 4 and result["student"]["num_layers"] == 2
    assert result["student"]["parameters"] < result["teacher"]["parameters"]
    assert result["student"]["parameters"] == sum(p.numel() for p in
                                                  LlamaForCausalLM.from_pretrained(out).parameters())
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    with pytest.raises(DistilError, match="already exists"):
        save_student(str(teacher_dir), out, num_layers=2)


@pytest.mark.slow
def test_smollm2_ten_layer_student(tmp_path, monkeypatch, smollm2):
    """The real SmolLM2-135M teacher -> 10 of 30 layers via the CLI path; loads without distil, finite logits."""
    monkeypatch.setenv("DISTIL_CACHE", str(smollm2.cache))  # converted once for the session
    out = tmp_path / "student"
    result = save_student("smollm2-135m-instruct", out, num_layers=10)
    assert result["layers"] == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    h, i, q, kv = 576, 1536, 576, 3 * 64  # hidden, MLP, query rows (9 x 64), KV rows (3 x 64)
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    assert result["student"]["parameters"] == 49152 * h + 10 * per_layer + h  # tied LM head counted once
    assert result["teacher"]["parameters"] == 49152 * h + 30 * per_layer + h
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    (got,) = load_in_clean_python(ids, (out, "AutoModelForCausalLM"))
    logits = torch.tensor(got["values"])
    assert got["class"] == "LlamaForCausalLM" and logits.numel() == 7 * 49152 and torch.isfinite(logits).all()
