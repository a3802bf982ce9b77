"""Tiny real teachers (a Llama built from a config, an MLP classifier) and samples for the teacher-cache tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 300  # above 256, so token ids are stored as uint16 as for real vocabularies


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def teacher() -> LlamaForCausalLM:
    return _llama(0)


@pytest.fixture(scope="session")
def student() -> LlamaForCausalLM:
    return _llama(1)


@pytest.fixture(scope="session")
def teacher_fn(teacher):
    def fn(batch):
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return fn


def make_samples(n: int = 23, seed: int = 0, first_id: int = 100) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        out.append({"id": first_id + 3 * i, "input_ids": torch.randint(0, VOCAB, (length,), generator=g)})
    return out


@pytest.fixture
def samples() -> list[dict]:
    return make_samples()


def dense_logprobs(model, sample: dict, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's log-probabilities for one sample, computed alone (no batching, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=sample["input_ids"][None]).logits[0]
    return torch.log_softmax(logits.double() / temperature, -1)


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.fixture(scope="session")
def helpers():
    class H:
        make_samples = staticmethod(make_samples)
        dense_logprobs = staticmethod(dense_logprobs)
        files_of = staticmethod(files_of)

    return H
