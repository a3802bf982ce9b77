"""Task embedding (sentence embeddings): a Hugging Face encoder teacher (e.g. all-MiniLM-L6-v2), a student
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.config.adapt import logit_loss, train_config
from distil.config.schema import FromTeacherSpec, HFModelSpec, Recipe, SentenceData
from distil.data.sources import data_problems, load_data
from distil.data.sources.sentences import SentenceCorpus
from distil.data.stream import BatchStream
from distil.distill.embedding import EmbeddingObjective, encode
from distil.distill.feature_objective import FeatureObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.measure.cost import folder_size, measure_latency, parameter_count
from distil.measure.embedding import embed_texts, retrieval_top1, similarity_spearman
from distil.models import hf
from distil.tasks.artifacts import INIT_FOLDER, arm_folder, is_model_folder
from distil.tasks.base import RunContext, data_and_model_rules, language_model_rules, not_causal_lm_rules
from distil.tasks.hf_models import feature_distiller, save_hf_folder, source_problems, student_from_teacher
from distil.train.loop import Stage, train
from distil.train.seed import seed_everything

# sentence-transformers' description of the pipeline (mean pooling, normalisation), copied so students load there too
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def _data(recipe: Recipe) -> SentenceData:
    assert isinstance(recipe.data, SentenceData)
    return recipe.data


class EmbeddingTask:
    name = "embedding"
    estimate = None  # no memory estimator yet

    def rules(self, recipe: Recipe) -> list[str]:
        found = data_and_model_rules(recipe, "sentences", ("hf", "from_teacher")) + not_causal_lm_rules(recipe)
        found += language_model_rules(recipe)
        if recipe.teacher.train is not None or recipe.teacher.checkpoint is not None:
            found.append("task embedding uses the teacher as given: remove teacher.train and teacher.checkpoint")
        if isinstance(recipe.data, SentenceData) and recipe.data.source != "wordnet" and "student_alone" in recipe.arms:
            found.append("task embedding: arm student_alone trains on WordNet (word, definition) pairs; use "
                         "data.source: wordnet or drop the arm")
        return found

    def problems(self, recipe: Recipe) -> list[str]:
        return data_problems(recipe.data) + source_problems(recipe)

    def deep_problems(self, recipe: Recipe) -> list[str]:
        """Load the teacher, build the student, check the data size and every feature term on a real batch."""
        try:
            teacher, tokenizer = load_teacher(recipe)
            student = _build_student(recipe, teacher, tokenizer)
            loaded = load_data(recipe.data, seed=recipe.seed, tokenizer=tokenizer)
            _check_sizes(recipe, loaded.corpus)
            if recipe.loss.features:
                batch = loaded.collate(torch.arange(2))
                feature_distiller(recipe, student, teacher, batch, torch.device("cpu"))
        except DistilError as exc:
            return [str(exc)]
        return []

    def start(self, ctx: RunContext) -> EmbeddingRun:
        return EmbeddingRun(ctx)


def _check_sizes(recipe: Recipe, corpus: SentenceCorpus) -> None:
    if len(corpus.train_texts) < recipe.train.batch_size:
        raise DistilError(f"train.batch_size={recipe.train.batch_size} exceeds the {len(corpus.train_texts)} training "
                          "items; lower train.batch_size or raise data.max_train")


def load_teacher(recipe: Recipe) -> tuple[nn.Module, Any]:
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
        if spec.calibration_batches:
            raise DistilError("student.model.calibration_batches is not supported for task embedding; remove it")
        return student_from_teacher(spec, teacher)
    assert isinstance(spec, HFModelSpec)
    differences = hf.tokenizer_differences(hf.load_tokenizer(spec.source), tokenizer)
    if differences:
        raise DistilError("student and teacher tokenizers differ: " + "; ".join(differences))
    return hf.load_model(spec.source, dtype="float32", trust_remote_code=spec.trust_remote_code)


def load_encoder_folder(folder: Path, device: torch.device) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).to(device)


def save_encoder_folder(folder: Path, model: nn.Module, tokenizer: Any, teacher_path: Path,
                        info: dict[str, Any]) -> None:
    """save_pretrained + tokenizer + the teacher's sentence-transformers files, written whole."""

    def copy_pipeline(tmp: Path) -> None:
        for name in ST_FILES:
            source = teacher_path / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.is_file():
                shutil.copy2(source, tmp / name)

    save_hf_folder(folder, model, tokenizer, info, extra=copy_pipeline)


class EmbeddingRun:
    """The teacher, the sentences and `student_init/`, which every arm starts from."""

    metrics = ["top1", "spearman"]

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        recipe, console = ctx.recipe, ctx.console
        hf.quiet_transformers()
        spec = recipe.teacher.model
        assert isinstance(spec, HFModelSpec)
        self.teacher_path = hf.resolve_model_path(spec.source)
        console.print(f"[bold]teacher[/bold]: {spec.source} ({self.teacher_path})")
        teacher, self.tokenizer = load_teacher(recipe)
        self.data = load_data(recipe.data, seed=recipe.seed, tokenizer=self.tokenizer)
        self.corpus = corpus = self.data.corpus
        _check_sizes(recipe, corpus)
        kind = "WordNet synsets (word + definition)" if corpus.has_pairs else "Shakespeare lines"
        console.print(f"data: {len(corpus.train_texts)} training {kind}; {len(corpus.eval_words)} held-out "
                      "(word, definition) pairs")
        self.init = ctx.run_dir / INIT_FOLDER
        if not is_model_folder(self.init):
            seed_everything(recipe.seed)
            student = _build_student(recipe, teacher, self.tokenizer)
            console.print(f"[bold]student[/bold]: {student.config.num_hidden_layers} layers, hidden "
                          f"{student.config.hidden_size}, {parameter_count(student):,} parameters "
                          f"(teacher {parameter_count(teacher):,})")
            save_encoder_folder(self.init, student, self.tokenizer, self.teacher_path, {})
        self.teacher = teacher.to(ctx.device).eval()

    def train_arm(self, arm: str, folder: Path) -> None:
        recipe, device, tokenizer, corpus = self.ctx.recipe, self.ctx.device, self.tokenizer, self.corpus
        seed_everything(recipe.seed)
        student = load_encoder_folder(self.init, device).train()
        if recipe.student.freeze_embeddings:  # inherited from the teacher; most of a small student's parameters
            student.get_input_embeddings().weight.requires_grad_(False)
        # The pooled embedding is the mean of the last hidden states: BERT's pooler gets no gradient (and DDP
        # refuses parameters that get none), so it stays as inherited.
        pooler = getattr(student, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)
        max_length = _data(recipe).max_length
        collate = self.data.collate
        teacher = None if arm == "student_alone" else Teacher(self.teacher)
        objective: Any = EmbeddingObjective(student, teacher, logit_loss(recipe.loss), device)
        if arm == "distilled" and recipe.loss.features:
            distiller = feature_distiller(recipe, student, self.teacher, collate(torch.arange(2)), device)
            self.ctx.console.print(distiller.describe(), markup=False, highlight=False)
            objective = FeatureObjective(objective, distiller, mask=lambda b: b["attention_mask"])
        stream = BatchStream(self.data.size, recipe.train.batch_size, collate, seed=recipe.seed)
        quick = (corpus.eval_words[:200], corpus.eval_definitions[:200])

        def evaluate() -> dict[str, float]:
            words = embed_texts(student, tokenizer, quick[0], device, max_length=max_length)
            return {"top1_200": retrieval_top1(words, embed_texts(student, tokenizer, quick[1], device,
                                                                  max_length=max_length))}

        stage = Stage(arm, objective, stream, train_config(recipe.train), self.ctx.run_dir / "checkpoints" / arm, self.ctx.metrics,
                      device, evaluate=evaluate, recipe=recipe.model_dump(mode="json"))
        train(stage, show_progress=self.ctx.show_progress)
        save_encoder_folder(folder, student, tokenizer, self.teacher_path,
                            {"train_time_s": stage.elapsed_s, "steps": recipe.train.steps})

    def measure(self) -> dict[str, dict[str, Any]]:
        recipe, device, corpus, tokenizer = self.ctx.recipe, self.ctx.device, self.corpus, self.tokenizer
        self.ctx.console.print("evaluating on held-out WordNet pairs ...")
        rows: dict[str, Any] = {}
        rows["teacher"], teacher_emb = measure_encoder(self.teacher, self.teacher_path, recipe, corpus, tokenizer,
                                                       None, device)
        for arm, folder in [("student_init", self.init)] + [(a, arm_folder(self.ctx.run_dir, a)) for a in recipe.arms]:
            rows[arm], _ = measure_encoder(load_encoder_folder(folder, device), folder, recipe, corpus, tokenizer,
                                           teacher_emb, device)
        return rows

    def summary_fields(self) -> dict[str, Any]:
        return {"eval_pairs": len(self.corpus.eval_words), "train_items": len(self.corpus.train_texts)}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        return summary


def measure_encoder(model: nn.Module, folder: Path, recipe: Recipe, corpus: SentenceCorpus, tokenizer: Any,
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


EMBEDDING = EmbeddingTask()
