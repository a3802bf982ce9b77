"""Causal-LM recipes whose student reads text with a tokenizer of its own (task causal_lm with two tokenizers).

The pre-flight of task causal_lm says which method a pair uses (`pair_method`): one vocabulary, one vocabulary with
padding rows, or two tokenizers; with two, the run is this one. Both models read the same examples (data.kind
dataset), each with its own tokenizer: plain texts (format text, prompt_completion: the prompt is context) or
conversations, which each model renders with its own chat template (distil.data.pairs). The arms:
- student_alone: the student's next-token CE on the reference texts;
- distilled, method logits: ULD or the vocabulary-mapped KL (loss.cross_tokenizer) at the positions aligned by
  character offsets, plus (1 - alpha) * CE (distil.distill.cross_tokenizer); with an onpolicy section, GKD's
  on-policy steps: the student's own continuations, read by both tokenizers and scored by the soft term;
- distilled, method response: the student's CE on the teacher's answers to the training prompts.
Every model is scored in bits per byte on the held-out texts (comparable across tokenizers), next to its perplexity
on its own tokens (not comparable across tokenizers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from distil.config.adapt import logit_loss, onpolicy, sampling, train_config
from distil.config.schema import DatasetData, HFModelSpec, Recipe
from distil.data.alignment import projected_vocab_map, token_bytes
from distil.data.formats import IGNORE, Columns, plain_texts, render, to_messages
from distil.data.pairs import Messages, PairRow, chat_pair, collate_pairs, text_pair
from distil.data.stream import BatchStream
from distil.data.sources.dataset import dataset_rows
from distil.distill.cross_tokenizer import CrossTokenizerLoss, CrossTokenizerObjective, Tokenizers, model_view
from distil.distill.lm import CausalLMObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.guards import check_sequence_length
from distil.generate import generate_responses
from distil.measure.lm import greedy_continuations
from distil.models import hf
from distil.precision import teacher_dtype
from distil.remembered import model_files_key, remembered
from distil.tasks.artifacts import INIT_FOLDER, arm_folder, is_model_folder
from distil.tasks.base import RunContext
from distil.tasks.causal_lm_measure import (architecture, benchmark_key, benchmark_problems, benchmark_score,
                                            measure_lm)
from distil.tasks.hf_models import save_hf_folder
from distil.train import distributed
from distil.train.loop import Stage, train
from distil.train.seed import seed_everything

EVAL_BATCH = 4
Example = tuple[str, int] | Messages  # (text, character where its trained part starts), or a conversation


def pair_method(student_tokenizer: Any, teacher_tokenizer: Any, student_vocab: int, teacher_vocab: int) -> str:
    """How a student learns a teacher's next-token distributions, in words (the pre-flight says it)."""
    if hf.tokenizer_differences(student_tokenizer, teacher_tokenizer):
        return (f"two tokenizers (student vocabulary {len(student_tokenizer):,}, teacher {len(teacher_tokenizer):,}): "
                "cross-tokenizer distillation at positions aligned by character offsets")
    if student_vocab != teacher_vocab:
        return (f"one tokenizer, LM heads of {student_vocab:,} and {teacher_vocab:,} rows: compared over the "
                f"{min(student_vocab, teacher_vocab):,} shared ones")
    return f"one tokenizer and vocabulary ({student_vocab:,}): token-level distillation at every position"


def cross_rules(recipe: Recipe) -> list[str]:
    """What a recipe with two tokenizers may hold, one line per rule broken."""
    found = []
    data = recipe.data
    if not isinstance(data, DatasetData):
        found.append("with two tokenizers both models read the same examples: use data.kind dataset (format text, "
                     "prompt_completion or chat)")
    elif data.packing:
        found.append("with two tokenizers each text is aligned on its own: set data.packing: false")
    elif data.format == "chat" and recipe.onpolicy is not None:
        found.append("on-policy steps across tokenizers continue plain prompts: use format prompt_completion or "
                     "text, or remove onpolicy")
    if recipe.teacher.train is not None:
        found.append("teacher.train (a teacher stage) is not yet supported across tokenizers: fine-tune the teacher in "
                     "a recipe of its own tokenizer and point teacher.model.source at that folder")
    if recipe.teacher.cache is not None:
        found.append("teacher.cache stores the teacher's distributions over its own tokens: remove it when the "
                     "tokenizers differ")
    for section, present in (("loss.features", bool(recipe.loss.features)),
                             ("student.lora", recipe.student.lora is not None)):
        if present:
            found.append(f"{section} is not supported yet when the tokenizers differ: remove it")
    if "logit_kd" in recipe.arms:
        found.append("with two tokenizers the arms are student_alone and distilled")
    return found


def deep_problems(recipe: Recipe) -> list[str]:
    """Read the texts and both models' configs: data size, context lengths, prompts for method response."""
    try:
        train_texts, _ = _texts(recipe)
        found = _text_problems(recipe, train_texts)
        if found:
            return found
        if isinstance(train_texts[0], list):  # both chat templates render the conversation, its contents intact
            tokenizers = [hf.load_tokenizer(spec.source) for spec in (_student_source(recipe), recipe.teacher.model)]
            chat_pair(train_texts[0], *tokenizers, max_length=recipe.data.seq_len)
        configs = {who: json.loads((hf.resolve_model_path(spec.source) / "config.json").read_text())
                   for who, spec in (("teacher", recipe.teacher.model), ("student", _student_source(recipe)))}
        check_sequence_length(recipe.data.seq_len, configs, key="data.max_length")
    except DistilError as exc:
        return [str(exc)]
    return []


def _text_problems(recipe: Recipe, train_texts: list[Example]) -> list[str]:
    """What the training examples themselves rule out: fewer than a batch; method response without prompts."""
    found = []
    if len(train_texts) < recipe.train.batch_size:
        found.append(f"train.batch_size={recipe.train.batch_size} exceeds the {len(train_texts)} training rows; lower "
                     "train.batch_size or give more rows")
    if recipe.method == "response_logits":
        found.append("method response_logits needs one tokenizer for both models; this pair has two: use method "
                     "response (the teacher's answers) or logits (its distributions, aligned across the tokenizers)")
    if recipe.method == "response":
        if recipe.generate is None:
            found.append("method response needs a generate section (max_new_tokens, batch_size, ...)")
        if not all(isinstance(t, tuple) and t[1] for t in train_texts):
            found.append("method response answers prompts: use data.format prompt_completion")
    return found


def _texts(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples: (text, trained_from) for formats text and prompt_completion, the messages
    of a conversation (with an assistant turn to learn) for format chat."""
    data = recipe.data
    assert isinstance(data, DatasetData)
    rows, held = dataset_rows(data, recipe.seed)
    if not held:
        raise DistilError("data: no held-out example to evaluate on; give data.eval_path or raise data.eval_fraction")
    columns = Columns(**data.columns.model_dump())
    if data.format == "chat":
        return _conversations(rows, columns, "data"), _conversations(held, columns, "held-out data")[
            : data.eval_examples]
    train_texts, _ = plain_texts(rows, data.format, columns)
    eval_texts, _ = plain_texts(held, data.format, columns, source="held-out data")
    return list(train_texts), list(eval_texts[: data.eval_examples])


def _conversations(rows: list[dict[str, Any]], columns: Columns, source: str) -> list[Example]:
    chats = [to_messages(row, columns, f"{source} row {n}") for n, row in enumerate(rows, 1)]
    chats = [m for m in chats if any(turn["role"] == "assistant" for turn in m[1:])]  # something to learn
    if not chats:
        raise DistilError(f"{source}: no conversation with an assistant turn after its first message")
    return chats


def _with_trained_tokens(examples: list[Example], run: CrossLMRun) -> tuple[list[Example], int]:
    """The examples with at least one trained student token within data.max_length tokens (a long prompt can leave none),
    and how many were dropped."""
    kept = [e for e in examples if any(label != IGNORE for label in run._pair_row(e).student_labels[1:])]
    return kept, len(examples) - len(kept)


def _first_answer(conversation: Messages) -> int:
    """The index of the first assistant turn after the opening message."""
    return next(i for i, turn in enumerate(conversation) if turn["role"] == "assistant" and i > 0)


def _last_user_turn(conversation: Messages) -> str:
    return conversation[_first_answer(conversation) - 1]["content"]


def _prompt(example: Example, tokenizer: Any) -> str:
    """What a model continues for the generations shown: a conversation up to its first answer in the model's own
    template; a prompt; a document's first 200 characters."""
    if isinstance(example, list):
        return render(tokenizer, example[: _first_answer(example)], generation_prompt=True)
    text, start = example
    return text[:start] if start else text[:200]


def _student_source(recipe: Recipe) -> HFModelSpec:
    spec = recipe.student.model
    if not isinstance(spec, HFModelSpec):
        raise DistilError("a student built from the teacher shares its tokenizer; with a tokenizer of its own the "
                          "student is student.model: {arch: hf, source: ...}")
    return spec


class CrossLMRun:
    """The teacher, the student's initial weights (`student_init/`), both tokenizers and the texts."""

    def __init__(self, ctx: RunContext, teacher_tokenizer: Any, student_tokenizer: Any):
        self.ctx = ctx
        recipe, console = ctx.recipe, ctx.console
        broken = cross_rules(recipe)
        if broken:
            raise DistilError("; ".join(broken))
        if distributed.active():
            raise DistilError("cross-tokenizer runs use one process; run without torchrun")
        t_spec = recipe.teacher.model
        assert isinstance(t_spec, HFModelSpec)
        self.t_tok, self.s_tok = teacher_tokenizer, student_tokenizer
        self.teacher_path = hf.resolve_model_path(t_spec.source)
        self.train_texts, self.eval_texts = _texts(recipe)
        self.train_texts, dropped = _with_trained_tokens(self.train_texts, self)
        self.eval_texts, dropped_eval = _with_trained_tokens(self.eval_texts, self)
        if dropped or dropped_eval:
            console.print(f"data: {dropped} training and {dropped_eval} held-out examples dropped: nothing to learn "
                          f"within data.max_length={recipe.data.seq_len} tokens of the student")
        if not self.eval_texts:
            raise DistilError("data: no held-out example keeps a trained token within data.max_length; raise it")
        broken = _text_problems(recipe, self.train_texts)
        if broken:
            raise DistilError("; ".join(broken))
        console.print(f"data: {len(self.train_texts)} training texts, {len(self.eval_texts)} held out")
        console.print(f"[bold]teacher[/bold]: {t_spec.source} ({self.teacher_path})")
        teacher, _ = hf.load_causal_lm(t_spec.source, dtype="float32", trust_remote_code=t_spec.trust_remote_code)
        self.init = ctx.run_dir / INIT_FOLDER
        if not is_model_folder(self.init):
            student, _ = hf.load_causal_lm(_student_source(recipe).source, dtype="float32")
            save_hf_folder(self.init, student.float(), student_tokenizer)
        student_vocab = json.loads((self.init / "config.json").read_text())["vocab_size"]
        console.print("pair: " + pair_method(student_tokenizer, teacher_tokenizer, student_vocab,
                                             teacher.config.vocab_size))
        dtype = teacher_dtype(t_spec.dtype, recipe.train.precision, ctx.device.type)  # bf16 where it is native
        self.teacher = (teacher.to(getattr(torch, dtype)) if dtype else teacher).to(ctx.device).eval()
        self.texts = {"student_alone": self.train_texts, "distilled": self.train_texts}
        if recipe.method == "response":
            self.texts["distilled"], _ = _with_trained_tokens(self._teacher_answers(), self)
        self.metrics = ["pass_at_1"] * (recipe.benchmark is not None) + ["bits_per_byte", "perplexity"]

    def _teacher_answers(self) -> list[tuple[str, int]]:
        """The teacher's answers to the training prompts (a prompt: the text before its trained part)."""
        recipe = self.ctx.recipe
        spec = recipe.generate
        assert spec is not None  # _text_problems
        prompts = [text[:start] for text, start in self.train_texts[: spec.num_prompts]]
        self.ctx.console.print(f"[bold]generate[/bold]: the teacher answers {len(prompts)} prompts")
        answers = generate_responses(self.teacher, self.t_tok, prompts, self.ctx.run_dir / "generations.jsonl",
                                     spec=replace(sampling(spec), chat_template=False),
                                     teacher_id=str(recipe.teacher.model.source),  # type: ignore[union-attr]
                                     seed=recipe.seed, show_progress=self.ctx.show_progress)
        return [(r["prompt"] + r["response"], len(r["prompt"])) for r in answers]

    def _pair_row(self, example: Example) -> PairRow:
        length = self.ctx.recipe.data.seq_len
        if isinstance(example, list):
            return chat_pair(example, self.s_tok, self.t_tok, max_length=length)
        return text_pair(example[0], self.s_tok, self.t_tok, max_length=length, trained_from=example[1])

    def _pairs(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate_pairs([self._pair_row(e) for e in examples], student_pad=self.s_tok.pad_token_id,
                             teacher_pad=self.t_tok.pad_token_id)

    # ------------------------------------------------------------------------------------------------- training
    def train_arm(self, arm: str, folder: Path) -> None:
        recipe, device = self.ctx.recipe, self.ctx.device
        texts = self.texts[arm]
        seed_everything(recipe.seed)
        student = hf.load_causal_lm(self.init, dtype="float32")[0].to(device)
        student.config.use_cache = False
        if recipe.student.freeze_embeddings:
            for head in (student.get_input_embeddings(), student.get_output_embeddings()):
                head.weight.requires_grad_(False)
        objective: Any
        if arm == "distilled" and recipe.method == "logits":
            loss = recipe.loss
            spec = CrossTokenizerLoss(method=loss.cross_tokenizer, alpha=loss.alpha, temperature=loss.temperature,
                                      top_k=loss.uld_top_k)
            vocab = projected_vocab_map(self.s_tok, self.t_tok) if spec.method == "mapped_kl" else None
            objective = CrossTokenizerObjective(
                student, Teacher(self.teacher), spec, vocab=vocab, device=device, onpolicy=onpolicy(recipe.onpolicy),
                tokenizers=Tokenizers(self.s_tok, self.t_tok, recipe.data.seq_len))
            batches = lambda i: self._pairs([texts[j] for j in i.tolist()])  # noqa: E731
        else:  # the student's own CE on the texts: the reference ones, or the teacher's answers
            objective = CausalLMObjective(student, None, logit_loss(recipe.loss), vocab_size=student.config.vocab_size,
                                          device=device, pad_token_id=self.s_tok.pad_token_id)
            batches = lambda i: model_view(self._pairs([texts[j] for j in i.tolist()]), "student")  # noqa: E731
        stream = BatchStream(len(texts), recipe.train.batch_size, batches, seed=recipe.seed)
        stage = Stage(arm, objective, stream, train_config(recipe.train), self.ctx.run_dir / "checkpoints" / arm,
                      self.ctx.metrics, device, recipe=recipe.model_dump(mode="json"))
        train(stage, show_progress=self.ctx.show_progress)
        student.config.use_cache = True
        save_hf_folder(folder, student, self.s_tok, {"train_time_s": stage.elapsed_s, "steps": recipe.train.steps})

    # ----------------------------------------------------------------------------------------------- evaluation
    def measure(self) -> dict[str, dict[str, Any]]:
        recipe, device = self.ctx.recipe, self.ctx.device
        self.ctx.console.print("evaluating teacher and students on held-out text (bits per byte) ...")
        pairs = [self._pairs(self.eval_texts[i : i + EVAL_BATCH]) for i in range(0, len(self.eval_texts), EVAL_BATCH)]
        shown = self._shown()
        repeats = min(2, recipe.latency_runs)
        problems = benchmark_problems(recipe)

        def measure_teacher() -> Any:
            row, predictions, texts = self._row(self.teacher, self.teacher_path, pairs, "teacher", repeats, None, shown)
            return {**row, **self._scored(self.teacher, "teacher", problems)}, predictions, texts

        what = {"model": model_files_key(self.teacher_path), "cross_tokenizer_eval": self._eval_key(),
                "dtype": str(next(self.teacher.parameters()).dtype),
                "shown": shown, "repeats": repeats, "device": str(device), "student_tokenizer": len(self.s_tok),
                **benchmark_key(recipe, problems)}
        rows: dict[str, Any] = {}
        rows["teacher"], _, teacher_samples = remembered(what, measure_teacher)
        samples = {"teacher": teacher_samples}
        speed = None
        for arm, folder in [("student_init", self.init)] + [(a, arm_folder(self.ctx.run_dir, a)) for a in recipe.arms]:
            model = hf.load_causal_lm(folder, dtype="float32")[0].to(device)
            rows[arm], _, texts = self._row(model, folder, pairs, "student", repeats, speed, shown)
            rows[arm].update(self._scored(model, arm, problems))
            speed = speed or (architecture(model), rows[arm])
            if arm != "student_init":
                samples[arm] = texts
        self.generations = [{"prompt": _prompt(e, None) if isinstance(e, tuple) else _last_user_turn(e),
                             **{name: texts[i] for name, texts in samples.items()}} for i, e in enumerate(shown)]
        return rows

    def _row(self, model: Any, folder: Path, pairs: list[dict[str, torch.Tensor]], who: str, repeats: int,
             speed: tuple | None, shown: list[Example]) -> tuple[dict[str, Any], torch.Tensor, list[str]]:
        tokenizer = self.t_tok if who == "teacher" else self.s_tok
        own = [model_view(b, who) for b in pairs]
        same = speed is not None and speed[0] == architecture(model)
        lengths = torch.tensor([len(b) if b is not None else 0 for b in token_bytes(tokenizer)])
        row, predictions = measure_lm(model, folder, own, model.config.vocab_size, None, tokenizer, repeats,
                                      speed=speed[1] if same else None, token_lengths=lengths)
        row.pop("agreement")  # top-1 tokens of two vocabularies do not compare
        prompts = [_prompt(example, tokenizer) for example in shown]  # in the model's own chat template
        return row, predictions, greedy_continuations(model, tokenizer, prompts)

    def _scored(self, model: Any, who: str, problems: list[dict[str, Any]] | None) -> dict[str, float]:
        tokenizer = self.t_tok if who == "teacher" else self.s_tok
        return benchmark_score(self.ctx.recipe, model, tokenizer, problems, who, self.ctx.run_dir,
                               self.ctx.show_progress)

    def _shown(self) -> list[Example]:
        """Held-out examples, evenly spaced, whose continuations go side by side in the report."""
        count = self.ctx.recipe.generations_shown
        step = max(1, len(self.eval_texts) // max(count, 1))
        return self.eval_texts[::step][:count]

    def _eval_key(self) -> str:
        digest = hashlib.sha256()
        digest.update(repr((self.eval_texts, self.ctx.recipe.data.seq_len)).encode())
        return digest.hexdigest()

    def summary_fields(self) -> dict[str, Any]:
        return {"method": self.ctx.recipe.method, "generations": self.generations,
                "pair": "cross-tokenizer", "cross_tokenizer_loss": self.ctx.recipe.loss.cross_tokenizer,
                "eval_texts": len(self.eval_texts)}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        return summary
