"""A hand-made causal-LM run directory: tiny random Llama teacher and students, a word-level tokenizer built from
real English text, and a summary / metrics log shaped like the LM pipeline's, for report and export tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml

# Public-domain text (Jane Austen, Pride and Prejudice, chapter 1), used to build the vocabulary and as real input.
TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want
of a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood,
this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of
some one or other of their daughters. My dear Mr. Bennet, said his lady to him one day, have you heard that
Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just
been here, and she told me all about it. Mr. Bennet made no answer. Do you not want to know who has taken it? cried
his wife impatiently. You want to tell me, and I have no objection to hearing it. This was invitation enough."""

SENTENCES = [s.strip() for s in re.split(r"(?<=[.?])\s+", " ".join(TEXT.split())) if s.strip()]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", TEXT)))
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab_size: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         pad_token_id=1, eos_token_id=2, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def make_lm_run(root: Path) -> Path:
    """Write the run directory and the teacher folder under `root`; return the run directory."""
    tokenizer = word_tokenizer()
    run_dir = root / "run"
    folders = {"teacher": root / "teacher", "student_alone": run_dir / "student_alone", "distilled": run_dir / "student"}
    arms = {}
    for n, (arm, folder) in enumerate(folders.items()):
        model = tiny_llama(len(tokenizer), layers=4 if arm == "teacher" else 2, seed=n)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        # Speeds and memory are hand-made here: these tests are about rendering and export, not about measuring.
        arms[arm] = {"perplexity": 180.0 - 20 * n, "agreement": None if arm == "teacher" else 0.3 + 0.1 * n,
                     "params": sum(p.numel() for p in model.parameters()), "size_bytes": size,
                     "tokens_per_s_b1": 900.0 + 300 * n, "tokens_per_s_b8": 5000.0 + 1000 * n,
                     "peak_memory_bytes": 4_000_000 - 1_000_000 * n, "path": str(folder)}
    summary = {
        "recipe": "tiny-lm", "task": "causal_lm", "metrics": ["perplexity", "agreement"], "arms": arms,
        "generations": [{"prompt": SENTENCES[i], "teacher": SENTENCES[i + 1], "student_alone": "<b>bold</b> & more",
                         "distilled": SENTENCES[i + 2]} for i in range(0, 6, 3)],
        "device": "cpu", "versions": {"python": "3", "torch": torch.__version__}, "created": "2026-01-01T00:00:00",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = []
    for arm in ("student_alone", "distilled"):
        for step in range(10, 60, 10):
            record = {"arm": arm, "step": step, "loss": 5.0 / step, "loss/ce": 4.0 / step, "lr": 1e-3 * (1 - step / 60),
                      "grad_norm": 1.0, "tokens_per_s": 1234.0}
            if arm == "distilled":
                record["loss/kd"] = 1.0 / step
            lines.append(record)
        lines.append({"arm": arm, "step": 50, "eval/perplexity": 150.0 if arm == "distilled" else 170.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # A valid recipe: its held-out file is the evaluation data that exports are checked and scored on.
    (root / "train.txt").write_text(" ".join(SENTENCES[:6]))
    (root / "eval.txt").write_text(" ".join(SENTENCES[6:]))
    recipe = {"name": "tiny-lm", "task": "causal_lm",
              "data": {"kind": "text", "source": "files", "train": [str(root / "train.txt")],
                       "eval": [str(root / "eval.txt")], "seq_len": 12, "eval_tokens": 256},
              "teacher": {"model": {"arch": "hf", "source": str(folders["teacher"])}},
              "student": {"model": {"arch": "from_teacher", "num_layers": 2}}, "train": {"steps": 5}}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_dir
