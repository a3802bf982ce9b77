"""Peak memory and time of token-level distillation losses over an LM head: distil's fused loss against the peers.

Ways to compute the same loss, a divergence between softmax(h_s @ W_s.T) and softmax(h_t @ W_t.T), then its
gradient with respect to the student's hidden states and LM-head weight:

- fused: ``distil.losses.fused_linear_divergence`` (chunks of tokens, logits never materialised);
- plain: materialised logits (student with autograd, teacher under no_grad) + ``distil.losses.DIVERGENCES[name]``;
- trl:   materialised logits + ``trl.GKDTrainer.generalized_jsd_loss``;
- liger, liger_eager: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, pure PyTorch on CPU; its chunk step under
  ``torch.compile``, or not), without the hard-label term;
- torchtune: ``ForwardKLWithChunkedOutputLoss`` on logits the student emits in 8 chunks (forward KL only; its value
  leaves out the teacher's entropy, a constant, so only the gradient compares).

The peers run with a separate Python (``--peer-python``, their own venv); none is installed into the project's.

Each case runs in a fresh process. Method (CPU): after the inputs exist and a tiny warm-up call has loaded the
kernels, the process resets its kernel peak-RSS counter (``echo 5 > /proc/self/clear_refs``), records VmRSS, runs
forward + backward ``--repeats`` times, and reports ``VmHWM - VmRSS`` (the peak resident memory added by the loss
computation, including the gradients it produces), the fastest forward + backward wall time and the CPU time of the
process over that run (all threads; steadier than wall time on a shared machine). Each case process
runs under an address-space limit (``--limit-gib``) so that a case too large for the machine fails with "OOM"
instead of disturbing others.

    python benchmarks/fused_memory.py --peer-python /work/bench-venv/bin/python --out benchmarks/results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
PATHS = ["fused", "plain", "trl", "liger", "liger_eager", "torchtune"]
PEERS = {"trl", "liger", "liger_eager", "torchtune"}  # run with --peer-python (their own venv)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _case(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    h_t = args.teacher_hidden or h
    # In-place init: no transient copies that would raise the process's memory before the measurement starts.
    hs = torch.randn(n, h).requires_grad_(True)
    ws = torch.randn(v, h).mul_(0.02).requires_grad_(True)
    ht = torch.randn(n, h_t)
    wt = torch.randn(v, h_t).mul_(0.02)
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
    elif args.path == "trl":
        from trl.experimental.gkd import GKDTrainer

        if args.divergence not in ("jsd", "generalized_jsd"):
            raise SystemExit("the trl path computes the generalized JSD only (forward KL: --divergence jsd --beta 0)")

        def loss_fn(hs, ws, ht, wt):
            s_logits = hs @ ws.T
            with torch.no_grad():
                t_logits = ht @ wt.T
            # With labels (as GKDTrainer.compute_loss passes them) "batchmean" is the mean over tokens, like ours.
            labels = torch.zeros(1, s_logits.shape[0], dtype=torch.long)
            return GKDTrainer.generalized_jsd_loss(
                s_logits[None], t_logits[None], labels=labels, beta=args.beta, temperature=args.temperature
            )
    elif args.path in ("liger", "liger_eager"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        if args.divergence not in ("jsd", "generalized_jsd"):
            raise SystemExit("the liger paths compute the generalized JSD only (forward KL: --divergence jsd --beta 0)")
        # Pure distillation (no hard-label CE, which Liger then skips), Liger's default chunk of 1,024 tokens.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta,
                                        temperature=args.temperature, compiled=args.path == "liger")
        labels = torch.zeros(n, dtype=torch.long)

        def loss_fn(hs, ws, ht, wt):
            return liger(hs, ws, ht, wt, labels[: hs.shape[0]])
    else:  # torchtune: the model emits its logits in 8 chunks (all kept for backward), the loss upcasts one at a time
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        if args.divergence != "forward_kl" and not (args.divergence in ("jsd", "generalized_jsd") and args.beta == 0):
            raise SystemExit("the torchtune path computes forward KL only")
        tune = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)

        def loss_fn(hs, ws, ht, wt):
            student = [c @ ws.T for c in hs.chunk(8)]
            with torch.no_grad():
                teacher = [c @ wt.T for c in ht.chunk(8)]
            labels = torch.zeros(1, hs.shape[0], dtype=torch.long)
            # torchtune drops the teacher's entropy (a constant): its value is the cross-entropy -sum p_t log p_s,
            # not the KL; the gradient is the same.
            return tune([c[None] for c in student], [c[None] for c in teacher], labels)

    # Warm-up on a slice: loads kernels and allocator pools without touching the full-size memory.
    small = loss_fn(hs[:8].detach().requires_grad_(True), ws[:64].detach().requires_grad_(True), ht[:8], wt[:64])
    small.backward()
    del small
    if args.path == "liger":  # compiled: compile at the measured shapes first, so that neither the compiler's time
        loss_fn(hs, ws, ht, wt).backward()  # nor its memory is counted
        hs.grad = ws.grad = None

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
        "time_median_s": statistics.median(times),
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
        rows[(r["vocab"], r["tokens"], r.get("label") or r["path"])] = r
    out = [
        "| vocab | tokens | path | peak MiB | / fused | wall s | / fused | CPU s | loss |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    def order(key: tuple) -> tuple:
        return key[0], key[1], PATHS.index(rows[key]["path"]), key[2]

    for (vocab, tokens, name), r in sorted(rows.items(), key=lambda kv: order(kv[0])):
        fused = rows.get((vocab, tokens, "fused"), {})
        wall_key = "time_median_s" if "time_median_s" in r else "time_s"
        if "peak_mib" in r:
            peak = f"{r['peak_mib']:,.0f}"
            ratio = "" if name == "fused" or "peak_mib" not in fused else f"{r['peak_mib'] / fused['peak_mib']:.2f}"
            wall, cpu, loss = f"{r[wall_key]:.1f}", f"{r['cpu_s']:.1f}", f"{r['loss']:.6f}"
            fused_wall = fused.get("time_median_s", fused.get("time_s"))
            speed = "" if name == "fused" or not fused_wall else f"{r[wall_key] / fused_wall:.2f}"
        elif "needs_more_than_mib" in r:
            bound = max(r["needs_more_than_mib"], r.get("peak_mib_before_oom", 0.0))
            peak = f"OOM: > {bound:,.0f}"
            ratio = "" if "peak_mib" not in fused else f"> {bound / fused['peak_mib']:.1f}"
            wall = cpu = loss = speed = "-"
        else:
            peak, ratio, wall, cpu, loss, speed = r.get("error", "?"), "", "-", "-", "-", ""
        out.append(f"| {vocab:,} | {tokens:,} | {name} | {peak} | {ratio} | {wall} | {speed} | {cpu} | {loss} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="store_true", help="internal: run one case in this process, print JSON")
    ap.add_argument("--path", choices=PATHS)
    ap.add_argument("--paths", default="fused,plain,trl")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--token-counts", default="1024,4096")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size of student and teacher (SmolLM2-135M: 576)")
    ap.add_argument("--teacher-hidden", type=int, default=None, help="the teacher's, when it differs (SmolLM2-360M: 960)")
    ap.add_argument("--divergence", default="jsd")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=None, help="fused path; default: the library's choice")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peer-python", "--trl-python", default=None,
                    help="a Python with trl, liger-kernel and torchtune installed (their own venv)")
    ap.add_argument("--limit-gib", type=float, default=18.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--label", default=None, help="the rows' name in the table (default: the path)")
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
        if path in PEERS and not args.peer_python:
            print(f"skip {path}: pass --peer-python", file=sys.stderr)
            continue
        case = {
            "path": path, "vocab": vocab, "tokens": tokens, "hidden": args.hidden,
            "teacher_hidden": args.teacher_hidden, "divergence": args.divergence,
            "beta": args.beta, "temperature": args.temperature, "repeats": args.repeats,
            "chunk_size": args.chunk_size if path == "fused" else None,
        }
        python = args.peer_python if path in PEERS else sys.executable
        result = _run_case(python, case, args.limit_gib, args.timeout)
        if args.label:
            result["label"] = args.label
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
