"""Teacher generation for response distillation: prompts in, a JSONL of answers out, resumable."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@dataclass(frozen=True)
class Sampling:
    """How the teacher answers: up to max_new_tokens, greedy or sampled (temperature, top_p), batch_size prompts at
    once, each prompt wrapped in the tokenizer's chat template when chat_template and it has one."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    chat_template: bool = True
    stop: tuple[str, ...] = ()  # an answer may end at any of these strings (kept in it; benchmarks cut there)


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """The text the model sees: the chat template's user turn plus generation prompt, when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Records written so far; a torn last line (the process died mid-write) is ignored and later rewritten."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _settings(spec: Sampling) -> dict[str, Any]:
    return {"max_new_tokens": spec.max_new_tokens, "do_sample": spec.do_sample, "temperature": spec.temperature,
            "top_p": spec.top_p, "chat_template": spec.chat_template}


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch `index`: a function of (seed, index) alone, so that a resumed run samples each batch
    exactly as an uninterrupted run does, whatever was generated before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append(sink: Any, data: bytes) -> None:
    """One batch's lines in one write (looping only on a short write), then fsync: a kill leaves whole batches, plus
    at most one torn one that the next run rewrites."""
    view, done = memoryview(data), 0
    while done < len(data):
        done += sink.write(view[done:])
    os.fsync(sink.fileno())


@torch.inference_mode()
def generate_responses(
    model: Any, tokenizer: Any, prompts: list[str], output: Path, *, spec: Sampling, teacher_id: str,
    seed: int = 0, show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Answer every distinct prompt once, appending one JSON line per answer to `output`.

    The distinct prompts are batched on a fixed grid (batch i holds prompts i*batch_size ... of the list) and batch i
    is sampled with the seed batch_seed(seed, i). A resumed run keeps the batches already answered whole, answers a
    batch left partly on disk again whole, and so writes the same bytes as an uninterrupted run."""
    unique = list(dict.fromkeys(prompts))
    grid = [unique[b : b + spec.batch_size] for b in range(0, len(unique), spec.batch_size)]
    records = read_generations(output)
    answered = {r["prompt"] for r in records}
    todo = [i for i, batch in enumerate(grid) if not all(p in answered for p in batch)]
    redo = {p for i in todo for p in grid[i]}
    # Keep whole batches only (and records of other prompts): drops a torn line and a batch the kill cut short.
    kept = "".join(json.dumps(r) + "\n" for r in records if r["prompt"] not in redo).encode("utf-8")
    output.parent.mkdir(parents=True, exist_ok=True)
    if not output.exists() or output.read_bytes() != kept:
        _replace_file(output, kept)
    output.with_name(output.name + ".tmp").unlink(missing_ok=True)  # a killed rewrite's, when none was needed now
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation pads on the left
    progress = Progress(TextColumn("[bold]generate[/bold]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(), disable=not show_progress)
    task = progress.add_task("generate", total=len(unique), completed=len(unique) - len(redo), rate="-")
    new_tokens, start = 0, time.perf_counter()
    try:
        with progress, open(output, "ab", buffering=0) as sink:
            for index in todo:
                batch = grid[index]
                texts = [format_prompt(tokenizer, p, spec.chat_template) for p in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                torch.manual_seed(batch_seed(seed, index))
                out = model.generate(
                    **enc, max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample,
                    temperature=spec.temperature if spec.do_sample else None,
                    top_p=spec.top_p if spec.do_sample else None, top_k=0 if spec.do_sample else None,
                    pad_token_id=tokenizer.pad_token_id, use_cache=True,
                    **({"stop_strings": list(spec.stop), "tokenizer": tokenizer} if spec.stop else {}),
                )
                answers = out[:, enc["input_ids"].shape[1] :]
                lines = []
                for prompt, row, mask in zip(batch, answers, enc["attention_mask"]):
                    ids = row.tolist()
                    if tokenizer.eos_token_id in ids:
                        ids = ids[: ids.index(tokenizer.eos_token_id)]
                    record = {"prompt": prompt, "response": tokenizer.decode(ids, skip_special_tokens=True),
                              "prompt_tokens": int(mask.sum()), "response_tokens": len(ids), "teacher": teacher_id,
                              "settings": _settings(spec)}
                    lines.append(json.dumps(record) + "\n")
                    new_tokens += len(ids)
                _append(sink, "".join(lines).encode("utf-8"))
                rate = new_tokens / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=len(batch), rate=f"{rate:.1f}")
    finally:
        tokenizer.padding_side = padding_side
    by_prompt = {r["prompt"]: r for r in read_generations(output)}
    return [by_prompt[p] for p in unique]
