"""Reading batches of targets from a teacher cache at training size (batch 8 x 2,048 tokens, vocabulary 49,152).

The cache is built from a synthetic teacher (random low-rank logits: reading cost does not depend on the teacher), in
top-k (k=64) and sampled (64 draws) modes. Timed: ``TeacherCache.targets`` for random batches of sample ids after
every shard was opened once (steady state, files in the page cache), median over the batches.

Run: PYTHONPATH=src python benchmarks/cache_read.py [--samples 48 --seq-len 2048 --batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distil.cache.build import build_cache
from distil.cache.reader import TeacherCache


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable numbers on a shared machine; DataLoader workers also use 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    left = torch.randn(args.vocab, 32, generator=g) * 0.6
    samples = [{"id": i, "input_ids": torch.randint(0, args.vocab, (args.seq_len,), generator=g)}
               for i in range(args.samples)]

    def teacher_fn(batch):
        h = torch.nn.functional.embedding(batch["input_ids"], left)  # [B, L, 32]
        return h @ left.T  # [B, L, V]: peaked where a token resembles the input token

    with tempfile.TemporaryDirectory() as d:
        print(f"batch of {args.batch} x {args.seq_len} tokens, vocabulary {args.vocab}")
        modes = (("topk k=64", dict(mode="topk", k=64)), ("sample 64 draws", dict(mode="sample", num_draws=64)))
        for name, kw in modes:
            path = Path(d) / name.replace(" ", "_")
            t0 = time.perf_counter()
            build_cache(path, samples, teacher_fn, batch_size=1, shard_size=8, progress=False, **kw)
            built = time.perf_counter() - t0
            cache = TeacherCache(path)
            for s in range(len(cache.manifest.shards)):
                cache._open(s)  # checksum + open once, as the first epoch does
            rng = np.random.default_rng(0)
            times = []
            for _ in range(args.batches):
                ids = rng.choice(args.samples, args.batch, replace=False)
                t1 = time.perf_counter()
                t = cache.targets(ids)
                times.append(time.perf_counter() - t1)
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items())
            print(f"{name:16s} read {statistics.median(times) * 1e3:7.2f} ms/batch (median of {args.batches}; "
                  f"p90 {np.percentile(times, 90) * 1e3:.2f}); build {built:.0f} s; {shapes}")


if __name__ == "__main__":
    main()
