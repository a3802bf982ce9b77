"""Teacher generation for response distillation: prompts in, a JSONL of answers out, resumable."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distil.config.schema import GenerateSpec


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


def _settings(spec: GenerateSpec) -> dict[str, Any]:
    return {"max_new_tokens": spec.max_new_tokens, "do_sample": spec.do_sample, "temperature": spec.temperature,
            "top_p": spec.top_p, "chat_template": spec.chat_template}


@torch.inference_mode()
def generate_responses(
    model: Any, tokenizer: Any, prompts: list[str], output: Path, *, spec: GenerateSpec, teacher_id: str,
    seed: int = 0, show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Answer every distinct prompt once, appending one JSON line per answer to `output`.

    Prompts already answered in `output` are skipped, so an interrupted generation resumes. Each batch is sampled
    with its own seed (seed + index of its first prompt), so resumed output equals uninterrupted output."""
    unique = list(dict.fromkeys(prompts))
    done = read_generations(output)
    answered = {r["prompt"] for r in done}
    # Rewrite the file from the parsed records: drops a torn last line left by a kill.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done), encoding="utf-8")
    os.replace(tmp, output)
    todo = [(i, p) for i, p in enumerate(unique) if p not in answered]
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation pads on the left
    progress = Progress(TextColumn("[bold]generate[/bold]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(), disable=not show_progress)
    task = progress.add_task("generate", total=len(unique), completed=len(unique) - len(todo), rate="-")
    new_tokens, start = 0, time.perf_counter()
    try:
        with progress, open(output, "a", encoding="utf-8") as sink:
            for b in range(0, len(todo), spec.batch_size):
                batch = todo[b : b + spec.batch_size]
                texts = [format_prompt(tokenizer, p, spec.chat_template) for _, p in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                torch.manual_seed(seed + batch[0][0])
                out = model.generate(
                    **enc, max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample,
                    temperature=spec.temperature if spec.do_sample else None,
                    top_p=spec.top_p if spec.do_sample else None, top_k=0 if spec.do_sample else None,
                    pad_token_id=tokenizer.pad_token_id, use_cache=True,
                )
                answers = out[:, enc["input_ids"].shape[1] :]
                for (index, prompt), row, mask in zip(batch, answers, enc["attention_mask"]):
                    ids = row.tolist()
                    if tokenizer.eos_token_id in ids:
                        ids = ids[: ids.index(tokenizer.eos_token_id)]
                    record = {"prompt": prompt, "response": tokenizer.decode(ids, skip_special_tokens=True),
                              "prompt_tokens": int(mask.sum()), "response_tokens": len(ids), "teacher": teacher_id,
                              "settings": _settings(spec)}
                    sink.write(json.dumps(record) + "\n")
                    new_tokens += len(ids)
                sink.flush()
                os.fsync(sink.fileno())
                rate = new_tokens / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=len(batch), rate=f"{rate:.1f}")
    finally:
        tokenizer.padding_side = padding_side
    by_prompt = {r["prompt"]: r for r in read_generations(output)}
    return [by_prompt[p] for p in unique]
