"""Cost of the loss alone (forward + backward on the logits): cross-entropy against the sparse divergences.

This is not the training-step benchmark (that needs the training loop): it isolates what the cache adds on top of
a plain CE step's loss, on logits ``[tokens, 49,152]`` in float32. Sparse targets are real top-k (k=64) and real
64-draw samples of a random teacher distribution.

Run: PYTHONPATH=src python benchmarks/cache_loss.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from distil.cache.writer import sample_targets, topk_targets
from distil.losses.sparse import sampled_forward_kl, sparse_forward_kl


def timed(fn, logits: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        x = logits.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(x).backward()
        if i >= 2:  # two warm-up rounds
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable numbers on a shared machine; DataLoader workers also use 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(args.tokens, args.vocab, generator=g) * 2
    teacher_lp = torch.log_softmax(torch.randn(args.tokens, args.vocab, generator=g) * 3, -1)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    ids, vals, tail = topk_targets(teacher_lp, 64)
    row_counts, sid, counts, entropy = sample_targets(teacher_lp, 64, g)
    width = int(row_counts.max())
    s_ids = torch.zeros(args.tokens, width, dtype=torch.long)
    s_w = torch.zeros(args.tokens, width)
    row = torch.repeat_interleave(torch.arange(args.tokens), row_counts)
    col = torch.arange(len(sid)) - torch.repeat_interleave(torch.cumsum(row_counts, 0) - row_counts, row_counts)
    s_ids[row, col], s_w[row, col] = sid, counts.float() / 64

    cases = {
        "cross-entropy (labels)": lambda x: F.cross_entropy(x, labels),
        "dense forward KL (live teacher logits)": lambda x: F.kl_div(
            torch.log_softmax(x, -1), teacher_lp, log_target=True, reduction="batchmean"),
        "sparse forward KL, top-64 + tail": lambda x: sparse_forward_kl(x, ids, vals, tail_logmass=tail),
        "sparse forward KL, top-64, no tail": lambda x: sparse_forward_kl(x, ids, vals),
        "sparse forward KL, top-64 + tail, peaked student (exact tail on every row)": None,
        f"sampled forward KL, 64 draws ({width} wide)": lambda x: sampled_forward_kl(
            x, s_ids, s_w, teacher_entropy=entropy),
    }
    # A student that already puts > 99.9% of its mass on the teacher's top 64 (every row takes the exact tail path).
    peaked = student.scatter_add(-1, ids, torch.full(ids.shape, 20.0))
    assert (1 - torch.softmax(peaked, -1).gather(-1, ids).sum(-1)).max() < 1e-3
    base = None
    print(f"loss forward+backward on [{args.tokens}, {args.vocab}] float32 logits, "
          f"torch threads {torch.get_num_threads()}")
    for name, fn in cases.items():
        if fn is None:
            ms = timed(lambda x: sparse_forward_kl(x, ids, vals, tail_logmass=tail), peaked, args.repeats)
        else:
            ms = timed(fn, student, args.repeats)
        base = base or ms
        print(f"| {name} | {ms:.1f} ms | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
