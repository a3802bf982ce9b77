"""Response distillation (sequence-level KD): the teacher answers prompts, the student is fine-tuned on the answers.

The student trained alone sees the same prompts with reference answers instead (for corpus prompts: the lines that
really follow the passage), so the two arms differ only in whose answers they learn from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from distil.config.adapt import sampling
from distil.config.schema import Recipe
from distil.data.formats import IGNORE, Example
from distil.data.packing import padded_batch, padded_batches
from distil.data.sources.dataset import DatasetCorpus
from distil.data.sources.text import corpus_passages, read_prompts_file
from distil.errors import DistilError
from distil.generate import format_prompt, generate_responses, read_generations
from distil.measure.benchmark import HUMANEVAL_COLUMNS, STOP_SEQUENCES, truncate
from distil.measure.lm import perplexity_and_predictions
from distil.train.distributed import on_main



def prompt_pairs(recipe: Recipe, corpus: Any, *, held_out: bool) -> list[tuple[str, str | None]]:
    """(prompt, reference answer) pairs: a dataset's own examples (data.kind dataset), passages of the text and the
    lines that follow them, or a prompts file (training prompts only)."""
    spec = recipe.generate
    assert spec is not None
    if isinstance(corpus, DatasetCorpus):  # prompts as the model sees them (a chat is rendered up to its answer)
        rows = corpus.eval if held_out else corpus.examples
        return list(corpus.prompt_pairs(rows[: spec.eval_prompts if held_out else spec.num_prompts]))
    if spec.prompts == "corpus" or held_out:
        texts = corpus.eval_texts if held_out else corpus.train_texts
        count = spec.eval_prompts if held_out else spec.num_prompts
        pairs = corpus_passages(texts, count, spec.prompt_lines, seed=recipe.seed + int(held_out))
        return [(spec.instruction + passage, continuation) for passage, continuation in pairs]
    return read_prompts_file(spec.prompts)[: spec.num_prompts]


def tokenize_pair(tokenizer: Any, prompt: str, response: str, max_len: int, chat: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels): the formatted prompt (labels ignored) then the response and EOS (labels kept).

    Over `max_len`, the prompt loses tokens from its start first (the response is what is learnt)."""
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt, chat), add_special_tokens=False)["input_ids"]
    response_ids = (tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_len - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_len) :]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def collate_pairs(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Callable[[torch.Tensor], dict]:
    """Indices -> a right-padded batch of those (input ids, labels) pairs."""
    return lambda indices: padded_batch([Example(*examples[int(i)]) for i in indices], pad_id)


def wraps_prompts(recipe: Recipe) -> bool:
    """Whether prompts get the chat template: a dataset's prompts are already in the form the model sees."""
    return bool(recipe.generate and recipe.generate.chat_template) and recipe.data.kind != "dataset"


def response_batches(recipe: Recipe, run_dir: Path, teacher: Any, tokenizer: Any, corpus: Any,
                     console: Console, show_progress: bool) -> dict[str, tuple[Callable, int]]:
    """Generate (or resume generating) the teacher's answers, then the training batches of each arm."""
    spec = recipe.generate
    assert spec is not None
    teacher_id = recipe.teacher.model.source  # type: ignore[union-attr]
    pairs = prompt_pairs(recipe, corpus, held_out=False)
    if "student_alone" in recipe.arms and any(ref is None for _, ref in pairs):
        raise DistilError("arm student_alone needs a reference 'response' for every prompt in generate.prompts; "
                          "add them or set arms=[distilled]")
    console.print(f"[bold]generate[/bold]: the teacher answers {len(pairs)} prompts (+{spec.eval_prompts} held out)")
    # Under torchrun rank 0 generates and writes the answers; every rank gets them.
    # Verified answers are programs: their generation may end where a new top-level statement starts.
    stop = STOP_SEQUENCES if spec.verify else ()
    settings = replace(sampling(spec), chat_template=wraps_prompts(recipe), stop=stop)
    answers = on_main(generate_responses, teacher, tokenizer, [p for p, _ in pairs], run_dir / "generations.jsonl",
                      spec=settings, teacher_id=teacher_id, seed=recipe.seed, show_progress=show_progress)
    held_out = prompt_pairs(recipe, corpus, held_out=True)
    on_main(generate_responses, teacher, tokenizer, [p for p, _ in held_out], run_dir / "eval_generations.jsonl",
            spec=settings, teacher_id=teacher_id, seed=recipe.seed + 1, show_progress=show_progress)
    if spec.verify:
        answers = on_main(verified_answers, recipe, answers, pairs, run_dir / "verified.jsonl", console)
    max_len, chat = recipe.data.seq_len, wraps_prompts(recipe)
    teacher_examples = [tokenize_pair(tokenizer, r["prompt"], r["response"], max_len, chat) for r in answers]
    result = {"distilled": (collate_pairs(teacher_examples, tokenizer.pad_token_id), len(teacher_examples))}
    if "student_alone" in recipe.arms:
        reference = [tokenize_pair(tokenizer, p, ref or "", max_len, chat) for p, ref in pairs]
        result["student_alone"] = (collate_pairs(reference, tokenizer.pad_token_id), len(reference))
    for arm, (_, size) in result.items():
        if size < recipe.train.batch_size:
            raise DistilError(f"{arm}: {size} examples, fewer than train.batch_size={recipe.train.batch_size}; "
                              "raise generate.num_prompts or lower train.batch_size")
    return result


def verified_answers(recipe: Recipe, answers: list[dict[str, Any]], pairs: list[tuple[str, str | None]],
                     output: Path, console: Console) -> list[dict[str, Any]]:
    """The teacher's answers that pass their problem's tests, the references elsewhere (rejection sampling).

    Each answer is cut where a new top-level statement starts (HumanEval's stop sequences) and run against its
    training row's tests in the sandbox; an answer that fails, or whose prompt has no row with tests, is replaced by
    the prompt's reference answer (dropped when there is none). The outcome of each is written to `output` (JSONL)."""
    from distil.data.sources.dataset import dataset_rows
    from distil.measure.code_execution import pass_at_1

    rows, _ = dataset_rows(recipe.data, recipe.seed)  # type: ignore[arg-type]
    missing = [c for c in HUMANEVAL_COLUMNS if rows and c not in rows[0]]
    if missing or not rows:
        raise DistilError(f"generate.verify runs each training row's tests, but the rows have no "
                          f"{', '.join(missing or HUMANEVAL_COLUMNS)} column; use rows with the columns "
                          f"{', '.join(HUMANEVAL_COLUMNS)} (HumanEval's) or set generate.verify: false")
    # The prompts are decoded from tokens: compared without the whitespace at their ends.
    rows_by_prompt = {row["prompt"].strip(): row for row in rows}
    references = {prompt: ref for prompt, ref in pairs}
    tested = [(n, rows_by_prompt[a["prompt"].strip()], truncate(a["response"])) for n, a in enumerate(answers)
              if a["prompt"].strip() in rows_by_prompt]
    _, outcomes = pass_at_1([row for _, row, _ in tested], [c for _, _, c in tested])
    passed = {n: completion for (n, _, completion), outcome in zip(tested, outcomes) if outcome.passed}
    tested_ids = {n for n, _, _ in tested}
    kept, lines = [], []
    for n, answer in enumerate(answers):
        reference = references.get(answer["prompt"])
        source = "teacher" if n in passed else "reference" if reference else "dropped"
        if source != "dropped":
            kept.append({**answer, "response": passed.get(n, reference), "source": source})
        lines.append(json.dumps({"prompt": answer["prompt"], "tested": n in tested_ids, "passed": n in passed,
                                 "kept": source}))
    output.write_text("\n".join(lines) + "\n")
    console.print(f"[bold]verify[/bold]: {len(passed)} of {len(answers)} teacher answers pass their tests "
                  f"({len(answers) - len(tested)} had none); the others are replaced by their reference answers")
    return kept


def _response_perplexity(model: Any, examples: list[tuple[list[int], list[int]]], pad_id: int, vocab: int) -> float:
    batches = padded_batches([Example(*e) for e in examples], pad_id, 4)
    return perplexity_and_predictions(model, batches, vocab_size=vocab)[0]


def response_perplexities(arms: dict[str, Any], run_dir: Path, recipe: Recipe, tokenizer: Any, vocab: int,
                          device: torch.device) -> dict[str, Any]:
    """Each model's perplexity on the teacher's answers to held-out prompts: how well it imitates the teacher."""
    from transformers import AutoModelForCausalLM

    records = read_generations(run_dir / "eval_generations.jsonl")
    if not records:
        return arms
    chat = wraps_prompts(recipe)
    examples = [tokenize_pair(tokenizer, r["prompt"], r["response"], recipe.data.seq_len, chat) for r in records]
    for name, values in arms.items():
        dtype = getattr(torch, values.get("dtype", "float32"))
        model = AutoModelForCausalLM.from_pretrained(values["path"], dtype=dtype).to(device).eval()
        values["response_perplexity"] = _response_perplexity(model, examples, tokenizer.pad_token_id, vocab)
    return arms
