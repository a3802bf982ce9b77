"""The fused KD + CE pass against the matmuls it cannot avoid, at the flagship's shapes.

One batch of 504 next-token positions (8 x 63), hidden 576, vocabulary 49,152 (SmolLM2), fp32, forward + backward
of `fused_linear_kd_and_ce` (forward KL, T = 1, kd and ce weights 0.5) and of `fused_linear_cross_entropy`, against
the three matmuls of the KD pass (student logits, teacher logits, gradient to the hidden states). Interleaved
round by round so that machine noise hits every kind alike; medians are reported. `--ref FILE` also times another
copy of fused_kd.py (e.g. `git show REV:src/distil/losses/fused_kd.py > /tmp/old_fused_kd.py`).

    python benchmarks/fused_kd_kernel.py --rounds 6
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from datetime import date

import torch

from distil.losses import fused_linear_cross_entropy
from distil.losses.fused_kd import fused_linear_kd_and_ce
from distil.measure.machine import cpu_model

N, H, V = 504, 576, 49152


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ref", help="another fused_kd.py to time beside this one")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight, t_hidden = torch.randn(V, H, generator=g) * 0.05, torch.randn(N, H, generator=g)
    t_weight, labels = torch.randn(V, H, generator=g) * 0.05, torch.randint(0, V, (N,), generator=g)

    def kd_pass(fn):
        def run() -> None:
            loss, _, _ = fn(hidden, weight, t_hidden, t_weight, labels, kd_weight=0.5, ce_weight=0.5)
            loss.backward()
        return run

    def matmuls() -> None:
        with torch.no_grad():
            z = hidden @ weight.T
            t_hidden @ t_weight.T
            z @ weight

    kinds = {"fused_kd_and_ce": kd_pass(fused_linear_kd_and_ce), "three_matmuls": matmuls,
             "fused_ce": lambda: fused_linear_cross_entropy(hidden, weight, labels).backward()}
    if args.ref:
        spec = importlib.util.spec_from_file_location("reference_fused_kd", args.ref)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        kinds["reference_fused_kd_and_ce"] = kd_pass(module.fused_linear_kd_and_ce)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds + 1):
        for name, run in kinds.items():
            begin = time.perf_counter()
            run()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - begin)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"date": str(date.today()), "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "rounds": args.rounds, "median_s": med,
                      "non_matmul_s": {k: med[k] - med["three_matmuls"] for k in med if "kd" in k}}, indent=1))


if __name__ == "__main__":
    main()
