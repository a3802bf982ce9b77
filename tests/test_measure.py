"""distil.measure.cost's measurements: throughput arithmetic, resident tensor bytes, peak inference memory on CPU."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from distil.measure import cost as report

MB = 1 << 20


def test_throughput_is_items_over_the_median_latency(monkeypatch):
    # A fake clock that advances 4 ms between the two readings around each call: no real timing involved.
    ticks = itertools.count()
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(ticks) * 0.002)
    assert report.measure_latency(lambda: None, runs=5, warmup=1) == pytest.approx(2.0)
    assert report.measure_throughput(lambda: None, items=64, runs=5) == pytest.approx(64 / 0.002)


def test_tensor_bytes_counts_parameters_and_buffers_by_dtype():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20)).to(torch.float64)
    # Linear 10*20 + 20; BatchNorm weight + bias + running mean + running var (float64) + num_batches_tracked (int64)
    assert report.tensor_bytes(model) == (220 + 4 * 20) * 8 + 8


needs_proc = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="peak RSS reset needs Linux's /proc/self/clear_refs")


FRESH_PROCESS_PEAK = """
import torch
from distil.measure import cost as report
MB = 1 << 20
def forward():
    # 64 MB written (so resident), freed before the next one: the peak is one buffer, not the sum.
    for _ in range(3):
        torch.ones(16 * MB)  # float32: 64 MB
print(report.peak_forward_memory(forward, "cpu"), report.peak_forward_memory(lambda: None, "cpu"))
"""


@needs_proc
def test_peak_forward_memory_sees_a_forward_pass_allocations_on_cpu():
    # In a fresh process, as in a deployment: in this long-lived test process glibc may serve the first buffer from
    # a freed heap chunk that stays resident (documented in peak_forward_memory), which would count it twice.
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PEAK], capture_output=True, text=True, check=True)
    peak, idle = map(int, result.stdout.split())
    assert 60 * MB <= peak <= 72 * MB
    assert idle < 4 * MB


@needs_proc
def test_measure_peak_memory_adds_the_resident_weights():
    model = nn.Linear(1024, 4096)  # 16 MB of weights
    x = torch.randn(2048, 1024)  # the output: 2048 x 4096 floats = 32 MB
    peak = report.measure_peak_memory(model, lambda: model(x), "cpu")
    assert report.tensor_bytes(model) + 30 * MB <= peak <= report.tensor_bytes(model) + 40 * MB


def test_bits_per_byte_of_a_uniform_model_by_hand(tiny_lm):
    """A model with a zero LM head predicts every token with 1/V: each counted target costs log2(V) bits."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.data.alignment import token_bytes
    from distil.measure.lm import bits_per_byte, perplexity_and_predictions

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    lengths = torch.tensor([len(b) if b is not None else 0 for b in token_bytes(tokenizer)])
    text = "Shall I compare thee to a summer's day? café"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    eos = torch.tensor([[tokenizer.eos_token_id]])
    labels = torch.cat([ids, eos], dim=1)  # the EOS spells no byte: counted in neither sum
    labels[0, 0] = -100
    batch = {"input_ids": labels.clamp_min(0), "labels": labels, "attention_mask": torch.ones_like(labels)}
    counted = labels[0, 1:-1]
    v = model.config.vocab_size
    want = len(counted) * math.log2(v) / sum(len(b) for b in [token_bytes(tokenizer)[i] for i in counted.tolist()])
    assert abs(bits_per_byte(model, [batch], token_lengths=lengths) - want) < 1e-5 * want
    assert int(lengths[ids[0]].sum()) == len(text.encode())
    ppl, _ = perplexity_and_predictions(model, [batch], vocab_size=v)
    assert abs(math.log(ppl) - math.log(v)) < 1e-5
