"""Peak memory and time of the cross-vocabulary losses over two LM heads: chunked vs plain.

The student's logits come from h_s @ W_s.T (vocabulary 49,152, SmolLM2's; hidden 576), the teacher's from
h_t @ W_t.T (vocabulary 151,936, Qwen2.5's; hidden 896), at 2,048 aligned positions; forward + backward with
respect to the student's hidden states and LM-head weight.

- chunked: ``distil.losses.cross_vocab.chunked_cross_vocab`` (each chunk's logits of both models exist only while
  the chunk is in use, and its gradient is taken there: nothing is recomputed in the backward pass);
- plain: both models' logits materialised, then ``uld`` / ``mapped_kl``;
- ``--top-k K``: ULD ranks each row's K largest probabilities instead of sorting all (``sorted_distance``).

The vocabulary map of mapped_kl is synthetic: ``--mapped`` random pairs, by default as many as SmolLM2 and Qwen2.5
really share (39,237, measured with ``distil.data.alignment.vocab_map``), and 10% of positions carry a multi-token
spelling. Each case runs in a fresh process; the peak is
``VmHWM - VmRSS`` after the inputs exist and a tiny warm-up (the method of fused_memory.py).

    python benchmarks/cross_vocab_memory.py --out benchmarks/cross_vocab_memory.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_memory import _status_kib  # noqa: E402  (the same peak-RSS method)


def _case(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, SRC)
    from distil.losses.cross_vocab import (Merges, VocabMap, chunked_cross_vocab, mapped_kl, mapped_kl_per_position,
                                           uld, uld_per_position)

    torch.manual_seed(0)
    n = args.tokens
    hs = torch.randn(n, args.student_hidden).requires_grad_(True)
    ws = torch.randn(args.student_vocab, args.student_hidden).mul_(0.05).requires_grad_(True)
    ht = torch.randn(n, args.teacher_hidden)
    wt = torch.randn(args.teacher_vocab, args.teacher_hidden).mul_(0.05)
    vocab = VocabMap(torch.randperm(args.teacher_vocab)[: args.mapped], torch.randperm(args.student_vocab)[: args.mapped])
    spelled = torch.rand(n) < 0.1
    merges = Merges(torch.where(spelled, torch.randint(0, args.student_vocab, (n,)), -1),
                    torch.randint(0, args.teacher_vocab, (n,)), torch.full((n,), -4.0))
    per_position, plain = {"uld": (uld_per_position, uld), "mapped_kl": (mapped_kl_per_position, mapped_kl)}[args.loss]

    def run(hs, ws, ht, wt, merges):
        extra = {"vocab": vocab, "merges": merges} if args.loss == "mapped_kl" else {}
        extra["top_k"] = args.top_k
        if args.path == "chunked":
            return chunked_cross_vocab(per_position, hs, ws, ht, wt, chunk_size=args.chunk_size, **extra)
        with torch.no_grad():
            t_logits = ht @ wt.T
        return plain(hs @ ws.T, t_logits, **extra)

    run(hs[:8], ws, ht[:8], wt, merges.rows(slice(0, 8))).backward()  # warm-up: kernels loaded, gradients allocated
    ws.grad = hs.grad = None
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    loss = run(hs, ws, ht, wt, merges)
    loss.backward()
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {"loss": args.loss, "path": args.path, "tokens": n, "student_vocab": args.student_vocab,
            "teacher_vocab": args.teacher_vocab, "mapped": args.mapped, "chunk_size": args.chunk_size,
            "top_k": args.top_k,
            "peak_mib": (_status_kib("VmHWM") - base) / 1024, "time_s": seconds, "cpu_s": cpu_s,
            "value": loss.item(), "grad_w_norm": ws.grad.norm().item(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="uld")
    parser.add_argument("--path", default="chunked")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--student-vocab", type=int, default=49152)
    parser.add_argument("--student-hidden", type=int, default=576)
    parser.add_argument("--teacher-vocab", type=int, default=151936)
    parser.add_argument("--teacher-hidden", type=int, default=896)
    parser.add_argument("--mapped", type=int, default=39237)  # SmolLM2 and Qwen2.5 share 39,237 (vocab_map)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=None, help="ULD's ranked entries per row (default: all)")
    parser.add_argument("--losses", default="uld,mapped_kl")
    parser.add_argument("--paths", default="chunked,plain")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(args)))
        return
    rows = []
    for loss in args.losses.split(","):
        for path in args.paths.split(","):
            cmd = [sys.executable, __file__, "--case", "--loss", loss, "--path", path, "--tokens", str(args.tokens),
                   "--student-vocab", str(args.student_vocab), "--student-hidden", str(args.student_hidden),
                   "--teacher-vocab", str(args.teacher_vocab), "--teacher-hidden", str(args.teacher_hidden),
                   "--mapped", str(args.mapped), "--chunk-size", str(args.chunk_size),
                   *(["--top-k", str(args.top_k)] if args.top_k else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
