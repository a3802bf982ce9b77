"""Peak memory and time of token-level distillation losses over an LM head: fused (chunked) vs plain vs TRL.

Three ways to compute the same loss, a divergence between softmax(h_s @ W_s.T) and softmax(h_t @ W_t.T), then
its gradient with respect to the student's hidden states and LM-head weight:

- fused: ``distil.losses.fused_linear_divergence`` (chunks of tokens, logits never materialised);
- plain: materialised logits (student with autograd, teacher under no_grad) + ``distil.losses.DIVERGENCES[name]``;
- trl:   materialised logits + ``trl.GKDTrainer.generalized_jsd_loss`` (run with a separate Python that has TRL,
  ``--trl-python``; TRL is never installed into the project's environment).

Each case runs in a fresh process. Method (CPU): after the inputs exist and a tiny warm-up call has loaded the
kernels, the process resets its kernel peak-RSS counter (``echo 5 > /proc/self/clear_refs``), records VmRSS, runs
forward + backward ``--repeats`` times, and reports ``VmHWM - VmRSS`` (the peak resident memory added by the loss
computation, including the gradients it produces), the fastest forward + backward wall time and the CPU time of the
process over that run (all threads; steadier than wall time on a shared machine). Each case process
runs under an address-space limit (``--limit-gib``) so that a case too large for the machine fails with "OOM"
instead of disturbing others.

    python benchmarks/fused_memory.py --trl-python /work/bench-venv/bin/python --out benchmarks/results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _case(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    # In-place init: no transient copies that would raise the process's memory before the measurement starts.
    hs = torch.randn(n, h).requires_grad_(True)
    ws = torch.randn(v, h).mul_(0.02).requires_grad_(True)
    ht = torch.randn(n, h)
    wt = torch.randn(v, h).mul_(0.02)
    params = {"beta": args.beta} if args.divergence in ("jsd", "generalized_jsd") else {}

    if args.path == "fused":
        sys.path.insert(0, SRC)
        from distil.losses import fused_linear_divergence

        def loss_fn(hs, ws, ht, wt):
            return fused_linear_divergence(
                hs, ws, ht, wt, divergence=args.divergence, temperature=args.temperature,
                chunk_size=args.chunk_size, **params,
            )
    elif args.path == "plain":
        sys.path.insert(0, SRC)
        from distil.losses import DIVERGENCES

        fn = DIVERGENCES[args.divergence]

        def loss_fn(hs, ws, ht, wt):
            s_logits = hs @ ws.T
            with torch.no_grad():
                t_logits = ht @ wt.T
            return fn(s_logits, t_logits, temperature=args.temperature, **params)
    else:
        from trl.experimental.gkd import GKDTrainer

        if args.divergence not in ("jsd", "generalized_jsd"):
            raise SystemExit("the trl path computes the generalized JSD only")

        def loss_fn(hs, ws, ht, wt):
            s_logits = hs @ ws.T
            with torch.no_grad():
                t_logits = ht @ wt.T
            # With labels (as GKDTrainer.compute_loss passes them) "batchmean" is the mean over tokens, like ours.
            labels = torch.zeros(1, s_logits.shape[0], dtype=torch.long)
            return GKDTrainer.generalized_jsd_loss(
                s_logits[None], t_logits[None], labels=labels, beta=args.beta, temperature=args.temperature
            )

    # Warm-up on a slice: loads kernels and allocator pools without touching the full-size memory.
    small = loss_fn(hs[:8].detach().requires_grad_(True), ws[:64].detach().requires_grad_(True), ht[:8], wt[:64])
    small.backward()
    del small

    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    times, cpu_times, value = [], [], None
    try:
        for _ in range(args.repeats):
            hs.grad = ws.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            loss = loss_fn(hs, ws, ht, wt)
            loss.backward()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            value = float(loss.detach())
            del loss
    except (RuntimeError, MemoryError) as e:
        # Out of the address-space limit: the case needed at least what it held then plus the allocation refused.
        # (Read while the traceback still holds the frames' tensors.)
        held = (_status_kib("VmRSS") - base) / 1024
        before = (_status_kib("VmHWM") - base) / 1024
        match = re.search(r"allocate (\d+) bytes", str(e))
        if match is None:
            raise
        return {
            "error": "OOM",
            "needs_more_than_mib": max(before, held + int(match.group(1)) / 2**20),
            "peak_mib_before_oom": before,
        }
    peak = _status_kib("VmHWM")
    return {
        "peak_mib": (peak - base) / 1024,
        "time_s": min(times),
        "cpu_s": min(cpu_times),
        "loss": value,
        "grad_w_norm": float(ws.grad.norm()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _run_case(python: str, case: dict, limit_gib: float, timeout: float) -> dict:
    cmd = [python, __file__, "--case"] + [f"--{k.replace('_', '-')}={v}" for k, v in case.items() if v is not None]

    def limit() -> None:
        cap = int(limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout > {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {**case, "error": tail[0]}
    result = {**case, **json.loads(proc.stdout.strip().splitlines()[-1])}
    if result.get("error") == "OOM":
        result["error"] = f"OOM under a {limit_gib:g} GiB address-space limit"
    return result


def _table(path: str) -> str:
    """A markdown table from the JSON lines (the last row of each case wins), with ratios to the fused path."""
    rows: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows[(r["vocab"], r["tokens"], r["path"])] = r
    out = [
        "| vocab | tokens | path | peak MiB | fused uses | wall s | CPU s | loss |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (vocab, tokens, path), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], "fpt".index(kv[0][2][0]))):
        fused = rows.get((vocab, tokens, "fused"), {}).get("peak_mib")
        if "peak_mib" in r:
            peak = f"{r['peak_mib']:,.0f}"
            ratio = "" if path == "fused" or not fused else f"{r['peak_mib'] / fused:.1f}x less"
            wall, cpu, loss = f"{r['time_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['loss']:.6f}"
        elif "needs_more_than_mib" in r:
            bound = max(r["needs_more_than_mib"], r.get("peak_mib_before_oom", 0.0))
            peak = f"OOM: > {bound:,.0f}"
            ratio = "" if not fused else f"> {bound / fused:.1f}x less"
            wall = cpu = loss = "-"
        else:
            peak, ratio, wall, cpu, loss = r.get("error", "?"), "", "-", "-", "-"
        out.append(f"| {vocab:,} | {tokens:,} | {path} | {peak} | {ratio} | {wall} | {cpu} | {loss} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="store_true", help="internal: run one case in this process, print JSON")
    ap.add_argument("--path", choices=["fused", "plain", "trl"])
    ap.add_argument("--paths", default="fused,plain,trl")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--token-counts", default="1024,4096")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size of student and teacher (SmolLM2-135M: 576)")
    ap.add_argument("--divergence", default="jsd")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=None, help="fused path; default: the library's choice")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trl-python", default=None, help="a Python with trl installed (its own venv)")
    ap.add_argument("--limit-gib", type=float, default=18.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="append results as JSON lines here")
    ap.add_argument("--table", default=None, help="print the markdown table of a results file and exit")
    args = ap.parse_args()

    if args.table:
        print(_table(args.table))
        return
    if args.case:
        print(json.dumps(_case(args)))
        return

    for vocab, tokens, path in itertools.product(
        map(int, args.vocabs.split(",")), map(int, args.token_counts.split(",")), args.paths.split(",")
    ):
        if path == "trl" and not args.trl_python:
            print("skip trl: pass --trl-python", file=sys.stderr)
            continue
        case = {
            "path": path, "vocab": vocab, "tokens": tokens, "hidden": args.hidden, "divergence": args.divergence,
            "beta": args.beta, "temperature": args.temperature, "repeats": args.repeats,
            "chunk_size": args.chunk_size if path == "fused" else None,
        }
        python = args.trl_python if path == "trl" else sys.executable
        result = _run_case(python, case, args.limit_gib, args.timeout)
        result["date"] = time.strftime("%Y-%m-%d %H:%M")
        result["load_avg_1min"] = round(os.getloadavg()[0], 2)  # the machine is shared: context for the times
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
