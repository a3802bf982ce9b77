"""The LM-head losses and the whole distillation step on CUDA: distil against Liger-Kernel's Triton kernel and the
plain path, and a KD step against its parts. Prepared for the first GPU machine; CI never runs it.

    python benchmarks/gpu_lm_step.py --out gpu-out                 # on a CUDA machine (liger-kernel optional)
    python benchmarks/gpu_lm_step.py --device cpu --small --out x   # the dry run on a CPU machine

Part 1, the loss alone (``loss/*``): forward + backward of forward KL between ``softmax(h_s @ W_s.T)`` and
``softmax(h_t @ W_t.T)`` at ``--vocab`` x ``--tokens`` (default 128,256 x 16,384, hidden 576 / 960), in the
``--dtype`` of the hidden states and heads (bf16 by default on CUDA): the plain path (materialised logits +
``distil.losses.forward_kl``), ``fused_linear_divergence``, Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta 0, its
Triton kernel) when it is installed, and ``fused_linear_cached_kd_and_ce`` against top-64 targets (KD weight 1, CE
weight 0). Peak memory is ``torch.cuda.max_memory_allocated`` above the inputs; time the median of ``--repeats``
after a warm-up, synchronised. Values and weight-gradient norms are printed so that agreement can be read off.

Part 2, the step (``step/*``): a random Llama-shaped teacher (SmolLM2-135M's shape: 30 layers, hidden 576, vocabulary
49,152) and the 10-layer student built from it, batches of ``--batch`` x ``--seq`` tokens, bf16 autocast on CUDA,
fused AdamW: the student's CE step alone, the teacher's forward alone, and distil's online KD step (one pass for KD
and CE) fused and plain. The KD step's time over (teacher forward + CE step) is the overhead of distillation.

Writes OUT/gpu_lm_step.json and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distil.distill.lm import CausalLMObjective  # noqa: E402
from distil.distill.pair import Teacher  # noqa: E402
from distil.config.schema import LossSpec, TrainSpec  # noqa: E402
from distil.losses import forward_kl, fused_linear_cached_kd_and_ce, fused_linear_divergence  # noqa: E402
from distil.students import make_student  # noqa: E402
from distil.train.optim import build_optimizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_mib(device: torch.device, base: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """(peak MiB above what was allocated before, times): one warm-up call, then ``repeats`` synchronised calls."""
    fn()
    base = peak_reset(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return peak_mib(device, base), times


def loss_cases(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n, v = args.tokens, args.vocab

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    hs, ws = make(n, args.hidden).requires_grad_(True), make(v, args.hidden, scale=0.02).requires_grad_(True)
    ht, wt = make(n, args.teacher_hidden), make(v, args.teacher_hidden, scale=0.02)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    with torch.no_grad():  # top-64 targets of the same teacher, for the cache-fed loss
        lp = torch.cat([torch.log_softmax((c @ wt.T).float(), -1) for c in ht.split(1024)])
        vals, ids = lp.topk(64, dim=-1)
        tail = torch.log1p(-vals.exp().sum(-1).clamp_max(1 - 1e-6))
        del lp
    cached = {"ids": ids, "logprobs": vals, "tail_logmass": tail, "mask": torch.ones(n, dtype=torch.bool, device=device),
              "temperature": torch.tensor(1.0)}

    def plain():
        return forward_kl(hs @ ws.T, (ht @ wt.T).detach())

    cases = {
        "loss/plain": plain,
        "loss/distil_fused": lambda: fused_linear_divergence(hs, ws, ht, wt),
        "loss/distil_fused_cached_top64": lambda: fused_linear_cached_kd_and_ce(
            hs, ws, cached, labels, kd_weight=1.0, ce_weight=0.0)[0],
    }
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)
        cases["loss/liger_fused_jsd"] = lambda: liger(hs, ws, ht, wt, labels)
    except ImportError:
        print("liger-kernel is not installed: its case is skipped (pip install liger-kernel)")
    results = []
    for name, fn in cases.items():
        def step():
            hs.grad = ws.grad = None
            loss = fn()
            loss.backward()
            step.value = float(loss.detach())

        try:
            mib, times = timed(step, device, args.repeats)
            row = {"case": name, "peak_mib": mib, "time_median_s": statistics.median(times), "loss": step.value,
                   "grad_w_norm": float(ws.grad.float().norm())}
        except torch.OutOfMemoryError as e:
            row = {"case": name, "error": f"OOM: {str(e).splitlines()[0]}"}
        hs.grad = ws.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(row))
        results.append(row)
    return results


def step_cases(args, device: torch.device) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    layers, hidden, vocab = (4, 64, 512) if args.small else (30, 576, 49152)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=9 if not args.small else 4, num_key_value_heads=3 if not args.small else 2,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    teacher = LlamaForCausalLM(config).to(device).eval()
    student = make_student(teacher, num_layers=max(2, layers // 3)).to(device).train()
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = build_optimizer(TrainSpec(steps=1, lr=1e-4), [p for p in student.parameters() if p.requires_grad])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    objectives = {
        "step/ce_alone": CausalLMObjective(student, None, LossSpec(), vocab_size=vocab, device=device),
        "step/kd_fused": CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=0.5), vocab_size=vocab,
                                           device=device),
        "step/kd_plain": CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=0.5, fused=False),
                                           vocab_size=vocab, device=device),
    }
    results = []

    def teacher_forward():
        with torch.no_grad(), autocast:
            teacher.model(input_ids=ids, use_cache=False)

    mib, times = timed(teacher_forward, device, args.repeats)
    results.append({"case": "step/teacher_forward", "peak_mib": mib, "time_median_s": statistics.median(times)})
    for name, objective in objectives.items():
        def one():
            with autocast:
                terms = objective.loss(batch)
            terms["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        mib, times = timed(one, device, args.repeats)
        results.append({"case": name, "peak_mib": mib, "time_median_s": statistics.median(times)})
    for row in results:
        print(json.dumps(row))
    t = {r["case"]: r["time_median_s"] for r in results}
    parts = t["step/teacher_forward"] + t["step/ce_alone"]
    summary = {"case": "step/kd_fused_over_parts", "ratio": t["step/kd_fused"] / parts,
               "tokens_per_s_kd_fused": args.batch * args.seq / t["step/kd_fused"]}
    print(json.dumps(summary))
    return results + [summary]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes: the CPU dry run")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--teacher-hidden", type=int, default=960)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="gpu-out")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --small for the dry run")
    if args.small:
        args.vocab, args.tokens, args.hidden, args.teacher_hidden, args.seq, args.batch = 2048, 512, 64, 96, 64, 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "vocab": args.vocab, "tokens": args.tokens, "batch": f"{args.batch} x {args.seq}"}
    print(json.dumps(env))
    rows = loss_cases(args, device, dtype) + step_cases(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_lm_step.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
