"""`distil.distill`: distil a teacher into a student from Python, with the models and data you already have.

    result = distil.distill(teacher, student, train_data, eval_data=held_out, steps=200, output_dir="runs/mine")
    result.run_dir, result.summary["arms"]["distilled"]

What the student is decides the task: a Hugging Face causal LM (it has an LM head) learns the teacher's next-token
distributions; a Hugging Face encoder (a `BertModel`-like model returning `last_hidden_state`) learns the teacher's
mean-pooled sentence embeddings; any other `nn.Module` is a classifier learning the teacher's logits and the labels.
The data is anything with `len()` and integer indexing (a `torch.utils.data.Dataset`, a Hugging Face
`datasets.Dataset`, a list). Its rows:

    classifier   (input, label) pairs, or dicts with "input" (or "x", "image", "pixel_values") and "label"
    causal LM    dicts with "input_ids" (optionally "labels", -100 where a token must not count) or "text", or str
    encoder      str, or dicts with "text"

Text is tokenized with `tokenizer` (truncated to `max_length` tokens). A causal-LM student with a tokenizer of its
own (`student_tokenizer`, differing from the teacher's `tokenizer`) reads the same texts with it: the loss is then
'mapped_kl' (default) or 'uld' at positions aligned by character offsets (distil.distill.cross_tokenizer), and both
models are scored in bits per byte, which does not depend on the tokenizer. The run directory holds what a recipe run
holds: checkpoints, metrics.jsonl, the trained student (`student/`), summary.json and report.html. Calling
`distill` again with the same `output_dir` resumes from the newest checkpoint, and returns at once when the student
is already trained, like `distil resume`; a second call on an `output_dir` in use is refused. The run goes through
the runner's arm loop (`distil.runner.run.run_arms`), as recipe runs do: the same objectives, training loop, model
folders, summary and report.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distil import runlock
from distil.data.alignment import projected_vocab_map
from distil.data.formats import IGNORE, Example
from distil.data.packing import model_inputs, packed_batch, padded_batch
from distil.data.stream import BatchStream
from distil.diskspace import tensor_bytes
from distil.data.pairs import pair_batch
from distil.distill.cross_tokenizer import CrossTokenizerLoss, CrossTokenizerObjective, cross_tokenizer_rows
from distil.distill.embedding import EmbeddingObjective, encode
from distil.distill.lm import CausalLMObjective
from distil.distill.objectives import ClassifierObjective, LogitLoss
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.losses.registry import divergence_spec
from distil.measure.classification import accuracy
from distil.measure.cost import folder_size, measure_latency, parameter_count
from distil.measure.embedding import similarity_spearman
from distil.models.hf import tokenizer_differences
from distil.runner.run import run_arms
from distil.tasks.artifacts import arm_folder, pick_device, save_model_folder
from distil.train.checkpoint import load_tensors, save_tensors, write_json
from distil.train.config import TrainConfig
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog
from distil.train.seed import seed_everything
from distil.train.signals import stop_signals

__all__ = ["DistillResult", "PythonRun", "distill", "task_of_model"]

ARM = "distilled"  # what the run trains, in the folder ARM_FOLDERS["distilled"] = student/
DEFAULT_LOSS = {"classification": "forward_kl", "causal_lm": "forward_kl", "embedding": "cosine",
                "cross_lm": "mapped_kl"}
METRICS = {"classification": ["accuracy"], "causal_lm": ["perplexity", "agreement"],
           "embedding": ["cosine_to_teacher", "spearman"], "cross_lm": ["bits_per_byte", "perplexity"]}


@dataclass
class DistillResult:
    run_dir: Path
    summary: dict[str, Any]


def task_of_model(student: nn.Module) -> str:
    """'causal_lm' for a Hugging Face model with an LM head, 'embedding' for one without, else 'classification'."""
    if not hasattr(student, "config") or not hasattr(student, "get_output_embeddings"):
        return "classification"
    return "causal_lm" if student.get_output_embeddings() is not None else "embedding"


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_data: Any,
    *,
    eval_data: Any = None,
    loss: str | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-4,
    tokenizer: Any = None,
    student_tokenizer: Any = None,
    max_length: int = 128,
    output_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    log_every: int = 10,
    save_every: int | None = None,
    show_progress: bool = False,
    report: bool = True,
    **divergence_params: float,
) -> DistillResult:
    """Train `student` to imitate `teacher` on `train_data` for `steps` optimizer steps; measure both on
    `eval_data` (default: the training data). Returns the run directory and its summary (summary.json).

    `loss` is a divergence of distil.losses (forward_kl, reverse_kl, jsd, skew_kl, ..., or dkd for classifiers;
    `divergence_params` its parameter: beta for jsd, skew for the skew KLs) combined as alpha * T^2 * divergence + (1 - alpha) * cross-entropy; for
    encoders it is the embedding term, cosine or mse. The student is trained in place and saved to RUN_DIR/student.
    """
    task = task_of_model(student)
    if task != "classification" and tokenizer is None and _needs_tokenizer(train_data):
        raise DistilError("the data holds text: pass tokenizer= (the teacher's) to tokenize it")
    if task == "causal_lm" and student_tokenizer is not None and tokenizer_differences(student_tokenizer, tokenizer):
        task = "cross_lm"
        if not _needs_tokenizer(train_data):
            raise DistilError("a student with its own tokenizer reads text: give rows of text (str or {'text': ...}), "
                              "not token ids")
    loss_name = loss or DEFAULT_LOSS[task]
    spec = _loss_spec(task, loss_name, alpha, temperature, divergence_params)
    run_dir = Path(output_dir) if output_dir else Path("runs") / f"distill-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    place = pick_device(device)
    arguments = {"api": "distil.distill", "task": task, "loss": asdict(spec), "steps": steps,
                 "batch_size": batch_size, "lr": lr, "max_length": max_length, "seed": seed}
    runlock.acquire(run_dir)  # a second distill() or `distil run` on this folder is refused, never both writing
    try:
        run = PythonRun(task, teacher.to(place).eval(), student, train_data, eval_data, spec, run_dir, place,
                        TrainConfig(steps=steps, lr=lr, log_every=log_every, save_every=save_every), batch_size,
                        seed, tokenizer, _collate(task, tokenizer, max_length, student_tokenizer), arguments,
                        show_progress, student_tokenizer)
        with stop_signals():
            write_json(run_dir / "distill.json", arguments)
            summary = run_arms(run, [ARM], run_dir, {"recipe": run_dir.name, "task": task}, device=place,
                               metrics=run.log, console=Console(quiet=not show_progress), report=report)
    finally:
        runlock.release(run_dir)
    return DistillResult(run_dir, summary)


class PythonRun:
    """`distill`'s one arm, as the runner's `TaskRun`: the user's models and data instead of a recipe's."""

    def __init__(self, task: str, teacher: nn.Module, student: nn.Module, train_data: Any, eval_data: Any,
                 spec: LogitLoss, run_dir: Path, device: torch.device, config: TrainConfig, batch_size: int,
                 seed: int, tokenizer: Any, collate: Any, arguments: dict[str, Any], show_progress: bool,
                 student_tokenizer: Any = None):
        self.task, self.teacher, self.student, self.spec = task, teacher, student, spec
        self.train_data, self.eval_data, self.run_dir, self.device = train_data, eval_data, run_dir, device
        self.config, self.batch_size, self.seed, self.tokenizer = config, batch_size, seed, tokenizer
        self.student_tokenizer = student_tokenizer if student_tokenizer is not None else tokenizer
        self.collate, self.arguments, self.show_progress = collate, arguments, show_progress
        self.metrics = METRICS[task]
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.trained = False

    def train_arm(self, arm: str, folder: Path) -> None:
        seed_everything(self.seed)
        student = self.student.to(self.device).train()
        objective = _objective(self.task, student, Teacher(self.teacher), self.spec, self.device, self.tokenizer,
                               self.student_tokenizer)
        data, collate = self.train_data, self.collate
        stream = BatchStream(len(data), self.batch_size, lambda i: collate([data[j] for j in i.tolist()]),
                             seed=self.seed)
        stage = Stage(arm, objective, stream, self.config, self.run_dir / "checkpoints" / arm, self.log, self.device,
                      recipe=self.arguments)
        train(stage, show_progress=self.show_progress)
        _save_student(folder, student, self.student_tokenizer,
                      {"train_time_s": stage.elapsed_s, "steps": self.config.steps})
        self.trained = True

    def measure(self) -> dict[str, dict[str, Any]]:
        folder = arm_folder(self.run_dir, ARM)
        if not self.trained:  # finished by an earlier call: read the saved student instead of training again
            self.student = _load_student(self.student, folder).to(self.device)
        data = self.eval_data if self.eval_data is not None else self.train_data
        batches = _batches(data, self.collate, self.batch_size)
        if self.task == "cross_lm":
            return cross_tokenizer_rows(self.teacher, self.student, batches, self.tokenizer, self.student_tokenizer,
                                        folder, self.device)
        return _measure(self.task, self.teacher, self.student, batches, folder, self.device)

    def summary_fields(self) -> dict[str, Any]:
        return {}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        return summary


# ---------------------------------------------------------------------------------------------- components
def _loss_spec(task: str, name: str, alpha: float, temperature: float, params: dict[str, float]
               ) -> LogitLoss | CrossTokenizerLoss:
    if task == "cross_lm":
        if name not in ("mapped_kl", "uld") or set(params) - {"kl_weight", "uld_weight", "top_k"}:
            raise DistilError(f"the teacher's and student's tokenizers differ: loss must be 'mapped_kl' (parameters "
                              f"kl_weight, uld_weight, top_k) or 'uld' (top_k), not {name!r} with {sorted(params)}")
        return CrossTokenizerLoss(method=name, alpha=alpha, temperature=temperature, **params)  # type: ignore[arg-type]
    if task == "embedding":
        if name not in ("cosine", "mse") or params:
            raise DistilError(f"an encoder student learns the teacher's embeddings with loss 'cosine' or 'mse' (no "
                              f"parameters), not {name!r}")
        return LogitLoss(embedding=name)
    if name == "dkd":
        if task != "classification":
            raise DistilError("loss 'dkd' is for classifiers")
        return LogitLoss(divergence=name, alpha=alpha, temperature=temperature)
    params = {"alpha" if key == "skew" else key: value for key, value in params.items()}  # alpha: the soft weight
    values = divergence_spec(name).resolve(params)  # unknown names and parameters are refused here
    fields = {"skew" if key == "alpha" else key: value for key, value in values.items()}  # alpha: the soft weight
    return LogitLoss(divergence=name, alpha=alpha, temperature=temperature, **fields)


def _objective(task: str, student: nn.Module, teacher: Teacher, spec: Any, device: torch.device,
               tokenizer: Any, student_tokenizer: Any = None) -> Any:
    if task == "cross_lm":
        vocab = projected_vocab_map(student_tokenizer, tokenizer) if spec.method == "mapped_kl" else None
        return CrossTokenizerObjective(student, teacher, spec, vocab=vocab, device=device)
    if task == "classification":
        return ClassifierObjective(student, teacher, spec, device)
    if task == "embedding":
        return EmbeddingObjective(student, teacher, spec, device)
    vocab = min(student.config.vocab_size, teacher.model.config.vocab_size)
    pad = getattr(tokenizer, "pad_token_id", None)
    return CausalLMObjective(student, teacher, spec, vocab_size=vocab, device=device, pad_token_id=pad)


def _needs_tokenizer(data: Any) -> bool:
    row = data[0]
    return isinstance(row, str) or (isinstance(row, dict) and "text" in row)


def _collate(task: str, tokenizer: Any, max_length: int, student_tokenizer: Any = None) -> Any:
    """Rows -> one batch in the form the task's objective reads."""

    def texts(rows: list[Any]) -> list[str]:
        return [row if isinstance(row, str) else row["text"] for row in rows]

    def cross_lm(rows: list[Any]) -> dict[str, torch.Tensor]:
        return pair_batch(texts(rows), student_tokenizer, tokenizer, max_length=max_length,
                          student_pad=_pad_id(student_tokenizer), teacher_pad=_pad_id(tokenizer))

    def tokens(values: Any) -> list[int]:  # a list, tensor or array of token ids
        return torch.as_tensor(values, dtype=torch.long).tolist()

    def classification(rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [_input_and_label(row) for row in rows]
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    def causal_lm(rows: list[Any]) -> dict[str, torch.Tensor]:
        if tokenizer is not None and _needs_tokenizer(rows):
            encoded = tokenizer(texts(rows), truncation=True, max_length=max_length)["input_ids"]
            rows = [{"input_ids": ids} for ids in encoded]
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else pad
        if all("position_ids" in row for row in rows):  # packed blocks (distil.data.load_lm_dataset(packing=True))
            return packed_batch([(Example(tokens(r["input_ids"]), tokens(r["labels"])), tokens(r["position_ids"]))
                                 for r in rows], pad, max(len(r["input_ids"]) for r in rows))
        return padded_batch([Example(tokens(r["input_ids"])[:max_length],
                                     tokens(r["labels"] if "labels" in r else r["input_ids"])[:max_length])
                             for r in rows], pad)

    def embedding(rows: list[Any]) -> dict[str, Any]:
        enc = tokenizer(texts(rows), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pairs": 0}

    return {"classification": classification, "causal_lm": causal_lm, "embedding": embedding,
            "cross_lm": cross_lm}[task]


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)


def _input_and_label(row: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(row, dict):
        key = next((k for k in ("input", "x", "image", "pixel_values") if k in row), None)
        if key is None or "label" not in row:
            raise DistilError(f"classifier rows need an input ('input', 'x', 'image' or 'pixel_values') and a "
                              f"'label'; got keys {sorted(row)}")
        x, y = row[key], row["label"]
    else:
        x, y = row
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def _batches(data: Any, collate: Any, batch_size: int) -> list[Any]:
    return [collate([data[j] for j in range(i, min(i + batch_size, len(data)))])
            for i in range(0, len(data), batch_size)]


# --------------------------------------------------------------------------------------------- the student
def _save_student(folder: Path, student: nn.Module, tokenizer: Any, info: dict[str, Any]) -> None:
    """A Hugging Face student as save_pretrained (+ tokenizer); any other module as safetensors weights and a
    config naming its class."""
    hf = hasattr(student, "save_pretrained")
    weights = None if hf else {k: v.detach().cpu() for k, v in student.state_dict().items()}

    def fill(tmp: Path) -> None:
        if weights is None:
            student.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            save_tensors(tmp / "model.safetensors", weights)
            write_json(tmp / "config.json", {"class": f"{type(student).__module__}.{type(student).__qualname__}"})
        write_json(tmp / "train.json", info)

    save_model_folder(folder, fill, lambda: tensor_bytes(student.state_dict().values(), files=8))


def _load_student(student: nn.Module, folder: Path) -> nn.Module:
    if hasattr(student, "save_pretrained"):
        return type(student).from_pretrained(folder, dtype=torch.float32)
    student.load_state_dict(load_tensors(folder / "model.safetensors"))
    return student


# ------------------------------------------------------------------------------------------------ measuring
def _measure(task: str, teacher: nn.Module, student: nn.Module, batches: list[Any], folder: Path,
             device: torch.device) -> dict[str, dict[str, Any]]:
    """Summary rows of teacher and student: the task's quality metrics on the evaluation data, size and latency."""
    student.eval()
    info = json.loads((folder / "train.json").read_text())
    rows = {"teacher": _cost(teacher, batches[0], device), ARM: _cost(student, batches[0], device)}
    rows[ARM].update(size_bytes=folder_size(folder), train_time_s=info.get("train_time_s"), path=str(folder))
    if task == "classification":
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        for name, model in (("teacher", teacher), (ARM, student)):
            rows[name]["accuracy"] = accuracy(model, x, y, device)
    elif task == "causal_lm":
        vocab = min(student.config.vocab_size, teacher.config.vocab_size)
        t_ppl, t_pred = _lm_scores(teacher, batches, vocab, device)
        s_ppl, s_pred = _lm_scores(student, batches, vocab, device)
        rows["teacher"].update(perplexity=t_ppl, agreement=1.0)
        rows[ARM].update(perplexity=s_ppl, agreement=float((s_pred == t_pred).float().mean()) if len(t_pred) else 0.0)
    else:
        t_emb, s_emb = (_embeddings(m, batches, device) for m in (teacher, student))
        rows["teacher"].update(cosine_to_teacher=1.0, spearman=1.0)
        rows[ARM].update(cosine_to_teacher=float((t_emb * s_emb).sum(-1).mean()),
                         spearman=similarity_spearman(s_emb, t_emb) if len(t_emb) > 2 else None)
    return rows


def _cost(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, tuple):
        example = batch[0][:1].to(device)
        forward = lambda: model(example)  # noqa: E731
    else:
        example = {k: v[:1] for k, v in model_inputs(batch, device).items()}
        forward = lambda: model(**example)  # noqa: E731
    return {"params": parameter_count(model), "latency_ms": measure_latency(forward, runs=5, warmup=1)}


@torch.inference_mode()
def _lm_scores(model: nn.Module, batches: list[Any], vocab: int, device: torch.device
               ) -> tuple[float, torch.Tensor]:
    """exp(mean next-token CE) over the positions that count, and the top-1 prediction at each of them."""
    nll, count, predictions = 0.0, 0, []
    for batch in batches:
        logits = model(**model_inputs(batch, device), use_cache=False).logits[:, :-1, :vocab].float()
        targets = batch["labels"][:, 1:].to(device)
        keep = targets != IGNORE
        nll += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
        predictions.append(logits[keep].argmax(-1).cpu())
    return math.exp(nll / max(count, 1)), torch.cat(predictions)


@torch.inference_mode()
def _embeddings(model: nn.Module, batches: list[Any], device: torch.device) -> torch.Tensor:
    return torch.cat([encode(model, **model_inputs(batch, device)).cpu() for batch in batches])
