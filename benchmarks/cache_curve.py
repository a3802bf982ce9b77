"""The teacher cache's size-quality curve: the flagship's distilled student trained from caches of several sizes
against the same student trained from the live teacher, over several training budgets.

For each budget (optimizer steps of 4 blocks of 64 tokens, each training block read once:
``data.max_train_tokens = steps * 256``) and each cache setting (top-k with k ids, or sampled with n draws), it
builds the cache with ``distil cache build``, trains the flagship's ``distilled`` arm from it with ``distil run``
(fp32, so that the curve does not depend on the CPU's bf16 support) and reads held-out perplexity, top-1 agreement
and the cache's bytes per token. Runs already done (a ``summary.json`` in place) are kept, so an interrupted curve
resumes.

    python benchmarks/cache_curve.py --out /tmp/curve --steps 64,256 \\
        --caches topk:64,topk:32,topk:16,topk:8,sample:64,sample:32,sample:16
    python benchmarks/cache_curve.py --out /tmp/curve --table      # the markdown table of what is there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distil.cache.info import cache_info  # noqa: E402

DISTIL = [sys.executable, "-m", "distil"]


def overrides(steps: int) -> list[str]:
    return [f"data.max_train_tokens={steps * 4 * 64}", f"train.steps={steps}", "train.precision=fp32",
            "arms=[distilled]"]


def cache_overrides(setting: str, path: Path) -> list[str]:
    mode, n = setting.split(":")
    size = f"teacher.cache.k={n}" if mode == "topk" else f"teacher.cache.num_draws={n}"
    return [f"teacher.cache.mode={mode}", size, f"teacher.cache.path={path}"]


def name(setting: str) -> str:
    return setting.replace(":", "")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - start


def measure(out: Path, steps: int, caches: list[str]) -> None:
    folder = out / f"s{steps}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "live" / "summary.json").exists():
        run(DISTIL + ["run", "-q", "smollm2-distil", *overrides(steps), f"output_dir={folder / 'live'}"],
            folder / "live.log")
    for setting in caches:
        n = name(setting)
        if (folder / n / "summary.json").exists():
            continue
        c = cache_overrides(setting, folder / f"cache-{n}")
        run(DISTIL + ["cache", "build", "-q", "smollm2-distil", *overrides(steps), *c], folder / f"{n}.build.log")
        run(DISTIL + ["run", "-q", "smollm2-distil", *overrides(steps), *c, f"output_dir={folder / n}"],
            folder / f"{n}.log")


def table(out: Path) -> str:
    lines = ["| budget | teacher signal | bytes/token | held-out perplexity | vs live | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|"]
    for folder in sorted(out.glob("s*"), key=lambda p: int(p.name[1:])):
        live_file = folder / "live" / "summary.json"
        if not live_file.exists():
            continue
        live = json.loads(live_file.read_text())["arms"]["distilled"]
        rows = [("live teacher, full distributions", None, live)]
        for summary in sorted(folder.glob("*/summary.json")):
            if summary.parent.name == "live":
                continue
            cache = folder / f"cache-{summary.parent.name}"
            info = cache_info(cache)
            s = info["settings"]
            label = f"top-{s['k']} + tail" if s["mode"] == "topk" else f"sampled, {s['num_draws']} draws"
            rows.append((label, info["bytes_per_token"], json.loads(summary.read_text())["arms"]["distilled"]))
        rows[1:] = sorted(rows[1:], key=lambda r: -r[1])
        steps = int(folder.name[1:])
        for label, bpt, arm in rows:
            ratio = "" if bpt is None else f"{(arm['perplexity'] / live['perplexity'] - 1) * 100:+.1f}%"
            lines.append(f"| {steps} steps ({steps * 4} blocks) | {label} | {'' if bpt is None else f'{bpt:.1f}'} | "
                         f"{arm['perplexity']:.2f} | {ratio} | {arm['agreement']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="64,256")
    ap.add_argument("--caches", default="topk:64,topk:32,topk:16,topk:8,sample:64,sample:32,sample:16")
    ap.add_argument("--table", action="store_true", help="print the table of the runs in --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.table:
        for steps in (int(s) for s in args.steps.split(",")):
            measure(out, steps, args.caches.split(","))
    print(table(out))


if __name__ == "__main__":
    main()
