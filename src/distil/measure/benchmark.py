"""Benchmarks scored by running what each model writes: HumanEval's pass@1 on held-out problems.

A recipe's `benchmark` section (task causal_lm, data.kind dataset) names the benchmark; its problems are the held-out
rows of the recipe's own data, which must carry HumanEval's columns (`prompt`, `test`, `entry_point`: the built-in
`humaneval`, or a JSONL of your own in that shape). Each model (teacher, the student before training, every arm)
completes each prompt greedily, without a chat template, as HumanEval is scored; a completion ends where a new
top-level statement starts (Codex's stop sequences). The completions are kept in `RUN_DIR/benchmark/<model>.jsonl`
(resumable: a killed evaluation continues where it stopped; the teacher's only in the run that measured it, since
later runs reuse its remembered row) and each is run against the problem's tests in a sandboxed process
(distil.measure.code_execution).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.generate import Sampling, generate_responses
from distil.measure.code_execution import pass_at_1

# A completion of a function body ends where the next top-level statement would begin.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
HUMANEVAL_COLUMNS = ("prompt", "test", "entry_point")


@dataclass(frozen=True)
class Benchmark:
    """How the benchmark runs: at most `problems` held-out problems (None: all), greedy completions of up to
    `max_new_tokens`, `batch_size` prompts at once, each program given `timeout_s` seconds."""

    problems: int | None = None
    max_new_tokens: int = 384
    batch_size: int = 8
    timeout_s: float = 10.0


def truncate(completion: str) -> str:
    """The completion up to its first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def humaneval_problems(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The held-out rows as problems; a clear error when they lack HumanEval's columns."""
    if not rows:
        raise DistilError("benchmark: no held-out rows; set data.eval_fraction or data.eval_path")
    missing = [c for c in HUMANEVAL_COLUMNS if c not in rows[0]]
    if missing:
        raise DistilError(f"benchmark humaneval runs each held-out row's tests, but the rows have no "
                          f"{', '.join(missing)} column; use data.path: humaneval or rows with the columns "
                          f"{', '.join(HUMANEVAL_COLUMNS)}")
    return rows[:limit] if limit else rows


def humaneval_pass_at_1(model: Any, tokenizer: Any, problems: list[dict[str, Any]], output: Path, spec: Benchmark,
                        *, model_id: str, show_progress: bool = True) -> float:
    """pass@1 of the model's greedy completions; completions and outcomes are written to `output` (JSONL)."""
    sampling = Sampling(max_new_tokens=spec.max_new_tokens, do_sample=False, batch_size=spec.batch_size,
                        chat_template=False, stop=STOP_SEQUENCES)
    generations = output.with_suffix(".generations.jsonl")
    records = generate_responses(model, tokenizer, [p["prompt"] for p in problems], generations, spec=sampling,
                                 teacher_id=model_id, show_progress=show_progress)
    by_prompt = {r["prompt"]: truncate(r["response"]) for r in records}
    completions = [by_prompt[p["prompt"]] for p in problems]
    rate, outcomes = pass_at_1(problems, completions, timeout_s=spec.timeout_s)
    lines = [json.dumps({"task_id": p.get("task_id", n), "completion": c, **asdict(o)})
             for n, (p, c, o) in enumerate(zip(problems, completions, outcomes))]
    output.write_text("\n".join(lines) + "\n")
    return rate
