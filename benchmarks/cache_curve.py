"""The teacher cache's size-quality curve: the flagship's distilled student trained from caches of several sizes
against the same student trained from the live teacher, over several training budgets.

For each budget (optimizer steps of 4 blocks of 64 tokens, each training block read once:
``data.max_train_tokens = steps * 256``) and each cache setting (top-k with k ids, or sampled with n draws), it
builds the cache with ``distil cache build``, trains the flagship's ``distilled`` arm from it with ``distil run``
(fp32, so that the curve does not depend on the CPU's bf16 support) and reads held-out perplexity, top-1 agreement
and the cache's bytes per token. ``--seeds`` repeats it with other recipe seeds (data order, the student's
adapters, the draws): at these budgets two live runs of different seeds differ by several percent, so a cache is
judged by its perplexity over the live run's of the same seed, averaged over seeds. Runs already done (a
``summary.json`` in place) are kept, so an interrupted curve resumes.

    python benchmarks/cache_curve.py --out /tmp/curve --steps 64,256 \\
        --caches topk:64,topk:32,topk:16,topk:8,sample:64,sample:32,sample:16,systematic:64,systematic:32
    python benchmarks/cache_curve.py --out /tmp/curve --steps 64 --seeds 0,1,2 --caches sample:64,systematic:48
    python benchmarks/cache_curve.py --out /tmp/curve --table      # the markdown table of what is there
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distil.cache.info import cache_info  # noqa: E402

DISTIL = [sys.executable, "-m", "distil"]


def overrides(steps: int, seed: int, lr: float | None = None) -> list[str]:
    chosen = [f"data.max_train_tokens={steps * 4 * 64}", f"train.steps={steps}", "train.precision=fp32",
              "arms=[distilled]", f"seed={seed}"]
    return chosen + ([f"train.lr={lr}"] if lr else [])


def cache_overrides(setting: str, path: Path) -> list[str]:
    """``topk:K``, ``sample:N`` (independent draws) or ``systematic:N``."""
    kind, n = setting.split(":")
    if kind == "topk":
        chosen = ["teacher.cache.mode=topk", f"teacher.cache.k={n}"]
    else:
        sampling = "systematic" if kind == "systematic" else "multinomial"
        chosen = ["teacher.cache.mode=sample", f"teacher.cache.num_draws={n}", f"teacher.cache.sampling={sampling}"]
    return [*chosen, f"teacher.cache.path={path}"]


def name(setting: str) -> str:
    return setting.replace(":", "")


def folder_of(out: Path, steps: int, seed: int, lr: float | None = None) -> Path:
    return out / (f"s{steps}" + (f"-lr{lr:g}" if lr else "") + (f"-seed{seed}" if seed else ""))


FOLDER = re.compile(r"s(?P<steps>\d+)(?:-lr(?P<lr>[^-]+(?:-\d+)?))?(?:-seed(?P<seed>\d+))?")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - start


def measure(out: Path, steps: int, caches: list[str], seed: int, lr: float | None) -> None:
    folder = folder_of(out, steps, seed, lr)
    caches_folder = folder_of(out, steps, seed)  # a cache does not depend on the learning rate: built once
    folder.mkdir(parents=True, exist_ok=True)
    common = ["run", "-q", "smollm2-distil", *overrides(steps, seed, lr)]
    if not (folder / "live" / "summary.json").exists():
        run(DISTIL + [*common, f"output_dir={folder / 'live'}"], folder / "live.log")
    for setting in caches:
        n = name(setting)
        if (folder / n / "summary.json").exists():
            continue
        c = cache_overrides(setting, caches_folder / f"cache-{n}")
        run(DISTIL + ["cache", "build", "-q", "smollm2-distil", *overrides(steps, seed), *c], folder / f"{n}.build.log")
        run(DISTIL + [*common, *c, f"output_dir={folder / n}"], folder / f"{n}.log")


def _label(settings: dict) -> str:
    if settings["mode"] == "topk":
        return f"top-{settings['k']} + tail"
    return f"sampled, {settings['num_draws']} {settings.get('sampling') or 'multinomial'} draws"


def table(out: Path) -> str:
    """One row per budget and teacher signal: perplexity per seed, and the mean over seeds of each run's perplexity
    over the live run's of the same seed (same data order, same held-out text)."""
    lines = ["| budget | teacher signal | bytes/token | held-out perplexity (seeds) | vs live: mean ± s.e. (range) | "
             "top-1 agreement |", "|---|---|---:|---:|---:|---:|"]
    runs: dict[str, dict[str, list]] = {}  # budget -> label -> [(seed, bytes/token, arm, live arm)]
    for summary in out.glob("s*/*/summary.json"):
        folder, kind = summary.parent.parent, summary.parent.name
        found = FOLDER.fullmatch(folder.name)
        if not found:
            continue
        steps, seed = int(found["steps"]), int(found["seed"] or 0)
        budget = f"{steps} steps ({steps * 4} blocks)" + (f", lr {found['lr']}" if found["lr"] else "")
        live_file = folder / "live" / "summary.json"
        if not live_file.exists():
            continue
        live = json.loads(live_file.read_text())["arms"]["distilled"]
        arm = json.loads(summary.read_text())["arms"]["distilled"]
        if kind == "live":
            label, bpt = "live teacher, full distributions", None
        else:
            info = cache_info(folder_of(out, steps, seed) / f"cache-{kind}")
            label, bpt = _label(info["settings"]), info["bytes_per_token"]
        runs.setdefault(budget, {}).setdefault(label, []).append((seed, bpt, arm, live))
    for budget in sorted(runs):
        rows = sorted(runs[budget].items(), key=lambda kv: -(kv[1][0][1] or 1e9))
        for label, found in rows:
            found.sort(key=lambda r: r[0])
            ppl = " / ".join(f"{arm['perplexity']:.2f}" for _, _, arm, _ in found)
            seeds = ",".join(str(seed) for seed, *_ in found)
            ratios = [arm["perplexity"] / live["perplexity"] - 1 for _, _, arm, live in found]
            vs = "" if found[0][1] is None else (f"{statistics.mean(ratios) * 100:+.1f}%" + (
                f" ± {statistics.stdev(ratios) / math.sqrt(len(ratios)) * 100:.1f} "
                f"({min(ratios) * 100:+.1f} .. {max(ratios) * 100:+.1f})" if len(ratios) > 1 else ""))
            bpt = "" if found[0][1] is None else f"{sum(r[1] for r in found) / len(found):.1f}"
            agreement = sum(arm["agreement"] for _, _, arm, _ in found) / len(found)
            lines.append(f"| {budget} | {label} | {bpt} | {ppl} (seeds {seeds}) | {vs} | "
                         f"{agreement:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="64,256")
    ap.add_argument("--caches", default="topk:64,topk:32,topk:16,topk:8,sample:64,sample:32,sample:16")
    ap.add_argument("--seeds", default="0", help="recipe seeds (data order, draws); each cache run is compared "
                                                     "with the live run of its seed")
    ap.add_argument("--lr", type=float, default=None, help="train.lr of every run (default: the recipe's)")
    ap.add_argument("--table", action="store_true", help="print the table of the runs in --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.table:
        for seed in (int(s) for s in args.seeds.split(",")):
            for steps in (int(s) for s in args.steps.split(",")):
                measure(out, steps, args.caches.split(","), seed, args.lr)
    print(table(out))


if __name__ == "__main__":
    main()
