"""Task causal_lm: a Hugging Face teacher, a student (often built from it), trained alone and distilled.

Stages: load the teacher; build `student_init/` (saved, so every arm starts from identical weights); for response
distillation, let the teacher answer prompts; train each arm; evaluate teacher, initial student and arms on held-out
text (perplexity, top-1 agreement with the teacher), generation speed at batch 1 and 8, and a few generations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distil.config.adapt import logit_loss, lora, onpolicy, train_config
from distil.config.schema import (RESPONSE_METHODS, TEACHER_ARMS, DatasetData, FromTeacherSpec, HFModelSpec, Recipe,
                                  TextData)
from distil.data.formats import IGNORE
from distil.data.packing import model_inputs, token_mask
from distil.data.sources import LoadedData, data_problems, load_data
from distil.data.stream import BatchStream
from distil.distill.cached import CachedLMObjective
from distil.distill.feature_objective import FeatureObjective
from distil.distill.lm import CausalLMObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.guards import check_sequence_length
from distil.losses.registry import SPARSE_DIVERGENCES
from distil.measure.cost import parameter_count
from distil.measure.lm import greedy_continuations, perplexity_and_predictions
from distil.models import hf
from distil.models.lora import AdaptersOnly, adapter_files, merged, with_lora, write_adapter
from distil.precision import teacher_dtype
from distil.remembered import Measurement, model_files_key, remembered
from distil.reporting.summary import write_summary
from distil.tasks import causal_lm_cache as cached
from distil.tasks import causal_lm_teacher as tuned
from distil.tasks import cross_lm
from distil.tasks.artifacts import INIT_FOLDER, arm_folder, is_model_folder
from distil.tasks.base import RunContext, data_and_model_rules, language_model_rules
from distil.tasks.causal_lm_estimate import estimate_causal_lm
from distil.tasks.causal_lm_measure import (BENCHMARK_DATA, architecture, benchmark_key, benchmark_problems,
                                            benchmark_score, measure_lm)
from distil.tasks.hf_models import feature_distiller, save_hf_folder, source_problems, student_from_teacher
from distil.tasks.response import response_batches, response_perplexities
from distil.train import distributed
from distil.train.loop import Stage, train
from distil.train.seed import seed_everything


class CausalLMTask:
    name = "causal_lm"
    estimate = staticmethod(estimate_causal_lm)

    def rules(self, recipe: Recipe) -> list[str]:
        found = (data_and_model_rules(recipe, ("text", "dataset"), ("hf", "from_teacher")) + language_model_rules(recipe)
                 + tuned.teacher_rules(recipe))
        own_data = isinstance(recipe.data, DatasetData)
        response = recipe.method in RESPONSE_METHODS
        if response and "logit_kd" in recipe.arms:
            found.append(f"method {recipe.method} has arms student_alone and distilled")
        if response and recipe.generate is None:
            found.append(f"method {recipe.method} needs a generate section (prompts, max_new_tokens, ...)")
        if response and recipe.onpolicy is not None:
            found.append(f"onpolicy applies to method logits, not {recipe.method}")
        if recipe.method == "response_logits" and recipe.distributed.teacher != "replicate":
            found.append("method response_logits: the whole teacher writes the answers before training, so it is not "
                         "sharded; use distributed.teacher: replicate")
        if response and recipe.generate and recipe.generate.verify and not own_data:
            found.append("generate.verify runs each answer against its row's tests: use data.kind dataset with "
                         "HumanEval's columns (prompt, test, entry_point)")
        if response and own_data and recipe.generate and recipe.generate.prompts != "corpus":
            found.append("with data.kind dataset the prompts are the dataset's own: leave generate.prompts out")
        if recipe.benchmark is not None and not own_data:
            found.append(BENCHMARK_DATA)
        if own_data and recipe.onpolicy is not None and recipe.data.packing:
            found.append("onpolicy samples one example per row: set data.packing: false")
        if recipe.teacher.cache is not None:
            if own_data:
                found.append("teacher.cache is built over data.kind text blocks; with data.kind dataset train from "
                             "the live teacher (remove teacher.cache)")
            if recipe.method != "logits" or recipe.onpolicy is not None:
                found.append("teacher.cache applies to off-policy logit distillation of causal LMs (task causal_lm, "
                             "method logits, no onpolicy section)")
            if recipe.loss.divergence not in SPARSE_DIVERGENCES:
                found.append(f"loss.divergence {recipe.loss.divergence} has no sparse form for cached targets; use "
                             f"{', '.join(SPARSE_DIVERGENCES)}")
            if recipe.teacher.cache.mode == "sample" and recipe.loss.divergence != "forward_kl":
                found.append(f"teacher.cache.mode sample (the default) supports loss.divergence forward_kl only; "
                             f"for {recipe.loss.divergence} set teacher.cache.mode=topk")
            if recipe.loss.features:
                found.append("loss.features read the live teacher's layers; remove teacher.cache to use them")
        if recipe.student.lora is not None and recipe.distributed.strategy == "fsdp":
            found.append("student.lora is not supported with distributed.strategy fsdp (the adapters are small: "
                         "use ddp)")
        if recipe.onpolicy is not None and recipe.distributed.strategy == "fsdp":
            found.append("onpolicy sampling is not supported with distributed.strategy fsdp (each process samples on "
                         "its own, but sharded models need every process in each forward); use ddp")
        if recipe.onpolicy and recipe.onpolicy.start_step >= recipe.train.steps:
            found.append(f"onpolicy.start_step ({recipe.onpolicy.start_step}) must be below train.steps "
                         f"({recipe.train.steps}): no step would be on-policy")
        if recipe.onpolicy and isinstance(recipe.data, TextData) and recipe.onpolicy.prompt_tokens >= recipe.data.seq_len:
            found.append(f"onpolicy.prompt_tokens ({recipe.onpolicy.prompt_tokens}) must be shorter than data.seq_len "
                         f"({recipe.data.seq_len})")
        return found

    def problems(self, recipe: Recipe) -> list[str]:
        """Checks that load nothing: data files and model sources exist."""
        found = data_problems(recipe.data) + source_problems(recipe)
        if recipe.method in RESPONSE_METHODS and recipe.generate and recipe.generate.prompts != "corpus":
            if not Path(recipe.generate.prompts).expanduser().is_file():
                found.append(f"generate.prompts: {recipe.generate.prompts} not found (a JSONL file, or 'corpus')")
        return found

    def deep_problems(self, recipe: Recipe) -> list[str]:
        """Load the tokenizers and the text: tokenizer agreement, context length, data size."""
        try:
            benchmark_problems(recipe)  # the held-out rows carry the benchmark's columns
            teacher_spec = recipe.teacher.model
            assert isinstance(teacher_spec, HFModelSpec)
            tokenizer = hf.load_tokenizer(teacher_spec.source, trust_remote_code=teacher_spec.trust_remote_code)
            if isinstance(recipe.student.model, HFModelSpec):
                s_tok = hf.load_tokenizer(recipe.student.model.source)
                if hf.tokenizer_differences(s_tok, tokenizer):  # the cross-tokenizer path (distil.tasks.cross_lm)
                    return cross_lm.cross_rules(recipe) or cross_lm.deep_problems(recipe)
                chat = isinstance(recipe.data, DatasetData) and recipe.data.format == "chat"
                if chat and (difference := hf.chat_template_difference(s_tok, tokenizer)):
                    return [difference]
            check_context(recipe, hf.resolve_model_path(teacher_spec.source))
            loaded = load_data(recipe.data, seed=recipe.seed, tokenizer=tokenizer)
            _check_sizes(recipe, loaded.size)
            if recipe.loss.features:  # module names, shapes and relation heads, on the real pair
                teacher, _ = hf.load_causal_lm(teacher_spec.source, dtype="float32")
                spec = recipe.student.model
                student = (student_from_teacher(spec, teacher) if isinstance(spec, FromTeacherSpec)
                           else hf.load_causal_lm(spec.source, dtype="float32")[0])
                feature_distiller(recipe, student, teacher, loaded.collate(torch.arange(2)), torch.device("cpu"),
                                  use_cache=False)
        except DistilError as exc:
            return [str(exc)]
        return []

    def pairing(self, recipe: Recipe) -> str:
        """How the student will learn the teacher's tokens (one vocabulary, padded, or two tokenizers), in words."""
        t_spec, s_spec = recipe.teacher.model, recipe.student.model
        assert isinstance(t_spec, HFModelSpec)
        t_tok = hf.load_tokenizer(t_spec.source, trust_remote_code=t_spec.trust_remote_code)
        vocab = lambda source: json.loads((hf.resolve_model_path(source) / "config.json").read_text())["vocab_size"]  # noqa: E731
        if not isinstance(s_spec, HFModelSpec):  # cut from the teacher: its tokenizer and head
            return cross_lm.pair_method(t_tok, t_tok, vocab(t_spec.source), vocab(t_spec.source))
        return cross_lm.pair_method(hf.load_tokenizer(s_spec.source), t_tok, vocab(s_spec.source), vocab(t_spec.source))

    def start(self, ctx: RunContext) -> CausalLMRun | cross_lm.CrossLMRun:
        spec = ctx.recipe.teacher.model
        if isinstance(ctx.recipe.student.model, HFModelSpec) and isinstance(spec, HFModelSpec):
            teacher_tokenizer = hf.load_tokenizer(spec.source, trust_remote_code=spec.trust_remote_code)
            student_tokenizer = hf.load_tokenizer(ctx.recipe.student.model.source)
            if hf.tokenizer_differences(student_tokenizer, teacher_tokenizer):
                return cross_lm.CrossLMRun(ctx, teacher_tokenizer, student_tokenizer)
        return CausalLMRun(ctx)


def check_context(recipe: Recipe, teacher_path: Path) -> None:
    config = json.loads((teacher_path / "config.json").read_text())
    check_sequence_length(recipe.data.seq_len, {"teacher": config}, key="data.seq_len")


def _check_sizes(recipe: Recipe, size: int) -> None:
    if recipe.method == "logits" and size < recipe.train.batch_size:
        text = isinstance(recipe.data, TextData)
        rows, more = ("blocks of data.seq_len tokens", "raise data.max_train_tokens") if text else ("rows", "give more rows")
        raise DistilError(f"train.batch_size={recipe.train.batch_size} exceeds the {size} training {rows}; lower "
                          f"train.batch_size or {more}")


def load_student_folder(folder: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)


def load_teacher(recipe: Recipe, path: Path | None = None) -> Any:
    """The teacher in fp32 on the CPU: from `path` (the tuned teacher's folder), else from its source."""
    t_spec = recipe.teacher.model
    assert isinstance(t_spec, HFModelSpec)
    model, _ = hf.load_causal_lm(path or t_spec.source, dtype="float32", trust_remote_code=t_spec.trust_remote_code)
    return model


def as_teacher(model: Any, recipe: Recipe, device: torch.device) -> Any:
    """The teacher in the recipe's dtype on `device`, in eval mode."""
    dtype = teacher_dtype(recipe.teacher.model.dtype, recipe.train.precision, device.type)  # type: ignore[union-attr]
    return (model.to(getattr(torch, dtype)) if dtype else model).to(device).eval()


def _build_init(recipe: Recipe, teacher: Any, teacher_vocab: int, tokenizer: Any, loaded: LoadedData, folder: Path,
                console: Console) -> None:
    spec = recipe.student.model
    if isinstance(spec, FromTeacherSpec):
        calibration = None
        if spec.calibration_batches:
            size = recipe.train.batch_size
            starts = range(0, min(loaded.size, spec.calibration_batches * size), size)
            batches = [loaded.collate(torch.arange(i, min(i + size, loaded.size))) for i in starts]
            calibration = [model_inputs(b, torch.device("cpu")) for b in batches]
        student = student_from_teacher(spec, teacher, calibration)
        console.print(f"[bold]student[/bold]: built from the teacher: {student.config.num_hidden_layers} layers, "
                      f"hidden {student.config.hidden_size}, {parameter_count(student):,} parameters "
                      f"(teacher {parameter_count(teacher):,})")
    else:
        assert isinstance(spec, HFModelSpec)
        student, s_tok = hf.load_causal_lm(spec.source, dtype="float32", trust_remote_code=spec.trust_remote_code)
        hf.shared_vocab_size(s_tok, tokenizer, student.config.vocab_size, teacher_vocab)
    save_hf_folder(folder, student.float(), tokenizer)


class CausalLMRun:
    """The teacher (live or from its cache), the held-out text and `student_init/`, which every arm starts from."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        recipe, device, console, run_dir = ctx.recipe, ctx.device, ctx.console, ctx.run_dir
        hf.quiet_transformers()
        t_spec = recipe.teacher.model
        assert isinstance(t_spec, HFModelSpec)
        self.teacher_path = hf.resolve_model_path(t_spec.source)
        check_context(recipe, self.teacher_path)
        self.tokenizer = tokenizer = hf.load_tokenizer(self.teacher_path, trust_remote_code=t_spec.trust_remote_code)
        loaded = load_data(recipe.data, seed=recipe.seed, tokenizer=tokenizer)
        self.corpus = corpus = loaded.corpus
        _check_sizes(recipe, loaded.size)
        console.print(corpus.describe())
        self.eval_batches = corpus.eval_batches()
        if recipe.teacher.train is not None:  # the teacher stage: from here on, the teacher is the tuned one
            self.teacher_path = tuned.reuse_or_tune(ctx, self.teacher_path, lambda: load_teacher(recipe), tokenizer,
                                                    loaded, self.eval_batches)
        self.init = init = run_dir / INIT_FOLDER
        cache_spec = recipe.teacher.cache
        # With a complete cache and an initial student, the teacher's weights are never loaded.
        builds_from_teacher = isinstance(recipe.student.model, FromTeacherSpec) and not is_model_folder(init)
        need_teacher = cache_spec is None or not cached.cache_is_complete(Path(cache_spec.path)) or builds_from_teacher
        teacher = None
        if need_teacher:
            console.print(f"[bold]teacher[/bold]: {t_spec.source} ({self.teacher_path})")
            teacher = load_teacher(recipe, self.teacher_path)
        if not is_model_folder(init):
            seed_everything(recipe.seed)
            teacher_vocab = json.loads((self.teacher_path / "config.json").read_text())["vocab_size"]
            _build_init(recipe, teacher, teacher_vocab, tokenizer, loaded, init, console)
        student_vocab = load_student_folder(init, torch.device("cpu")).config.vocab_size

        self.cache = None
        if cache_spec is not None:
            if not cached.cache_is_complete(Path(cache_spec.path)):
                teacher = as_teacher(teacher, recipe, device)
                result = cached.build_for_recipe(recipe, teacher, tokenizer, corpus, show_progress=ctx.show_progress)
                cached.describe(result, console)
                vocab = min(teacher.config.vocab_size, student_vocab)
                built_by = teacher

                def teacher_eval() -> None:
                    row, predictions = measure_lm(built_by, self.teacher_path, self.eval_batches, vocab, None,
                                                  tokenizer)
                    cached.write_teacher_eval(Path(cache_spec.path), row, predictions)

                distributed.on_main(teacher_eval)
            teacher = None  # training and evaluation read the cache, not the teacher
            self.cache = cached.open_cache(recipe, tokenizer, corpus)
            self.vocab = min(self.cache.vocab_size, student_vocab)
            console.print(f"[bold]teacher[/bold]: read from the cache {cache_spec.path} (the teacher is not run)")
        else:
            # A teacher to be sharded stays in CPU memory until the loop shards it: no device ever holds all of it.
            placed = recipe.distributed.teacher != "replicate" and distributed.active() and recipe.method == "logits"
            teacher = as_teacher(teacher, recipe, torch.device("cpu") if placed else device)
            self.vocab = min(teacher.config.vocab_size, student_vocab)
        self.teacher = teacher

        if recipe.method in RESPONSE_METHODS:
            self.arm_data = response_batches(recipe, run_dir, teacher, tokenizer, corpus, console, ctx.show_progress)
        else:
            self.arm_data = {arm: (loaded.collate, loaded.size) for arm in recipe.arms}
        self.metrics = ["pass_at_1"] * (recipe.benchmark is not None) + ["perplexity", "agreement"]

    # ------------------------------------------------------------------------------------------------- training
    def train_arm(self, arm: str, folder: Path) -> None:
        recipe, device = self.ctx.recipe, self.ctx.device
        # Response distillation is supervised fine-tuning on the teacher's answers: no live teacher in the loss
        # (response_logits adds the teacher's distribution on those answers as the soft term).
        live = Teacher(self.teacher) if self.teacher is not None and recipe.method != "response" else None
        batches, size = self.arm_data[arm]
        seed_everything(recipe.seed)
        student = load_student_folder(self.init, device)
        student.config.use_cache = False
        wrapper = None
        if recipe.student.lora is not None:  # seeded above: the same adapters in every arm and on resume
            wrapper = with_lora(student, lora(recipe.student.lora))
            trained, total = wrapper.get_nb_trainable_parameters()
            self.ctx.console.print(f"{arm}: LoRA adapters, {trained:,} trained parameters of {total:,}")
        elif recipe.student.freeze_embeddings:
            for head in (student.get_input_embeddings(), student.get_output_embeddings()):
                head.weight.requires_grad_(False)
        distilled = arm == "distilled"  # logit_kd: plain off-policy logit KD, the baseline of the recipe's variant
        kd = arm in TEACHER_ARMS
        objective: Any
        if kd and self.cache is not None:
            objective = CachedLMObjective(student, self.cache, logit_loss(recipe.loss), device=device)
        else:
            objective = CausalLMObjective(
                student, live if kd else None, logit_loss(recipe.loss), vocab_size=self.vocab, device=device,
                onpolicy=onpolicy(recipe.onpolicy) if distilled else None, pad_token_id=self.tokenizer.pad_token_id,
            )
        if wrapper is not None:
            objective.modules["student"] = AdaptersOnly(student)  # checkpoints hold the adapters alone
        if distilled and recipe.loss.features and live is not None:
            distiller = feature_distiller(recipe, student, live.model, batches(torch.arange(2)), device,
                                          use_cache=False)
            print(distiller.describe())
            objective = FeatureObjective(objective, distiller, mask=token_mask)
        stream = BatchStream(size, recipe.train.batch_size, batches, seed=recipe.seed)
        quick_eval = self.eval_batches[:2]
        stage = Stage(arm, objective, stream, train_config(recipe.train), self.ctx.run_dir / "checkpoints" / arm, self.ctx.metrics,
                      device, recipe=recipe.model_dump(mode="json"),
                      evaluate=lambda: {"perplexity": perplexity_and_predictions(student, quick_eval,
                                                                                 vocab_size=self.vocab)[0]})
        train(stage, show_progress=self.ctx.show_progress)
        student.config.use_cache = True
        extra = None
        if wrapper is not None:
            if recipe.student.lora.save_adapter:  # type: ignore[union-attr]
                weights, config = adapter_files(wrapper, self.init)
                extra = lambda tmp: write_adapter(tmp / "adapter", weights, config)  # noqa: E731
            student = merged(wrapper)
        save_hf_folder(folder, student, self.tokenizer, {"train_time_s": stage.elapsed_s, "steps": recipe.train.steps},
                       extra=extra)

    # ----------------------------------------------------------------------------------------------- evaluation
    def measure(self) -> dict[str, dict[str, Any]]:
        recipe, device, corpus, tokenizer = self.ctx.recipe, self.ctx.device, self.corpus, self.tokenizer
        teacher = self.teacher
        if teacher is not None and distributed.is_sharded(teacher):
            teacher = as_teacher(load_teacher(recipe, self.teacher_path), recipe, device)
        self.ctx.console.print("evaluating teacher and students on held-out text ...")
        repeats = min(2, recipe.latency_runs)  # timed generations per speed (each is 32 new tokens)
        rows: dict[str, Any] = {}
        prompts = corpus.sample_prompts(recipe.generations_shown)
        samples: dict[str, list[str]] = {}
        problems = benchmark_problems(recipe)

        def scored(model: Any, who: str) -> dict[str, float]:
            return benchmark_score(recipe, model, tokenizer, problems, who, self.ctx.run_dir, self.ctx.show_progress)

        if teacher is not None:
            def measure_teacher() -> Measurement:
                row, predictions = measure_lm(teacher, self.teacher_path, self.eval_batches, self.vocab, None,
                                              tokenizer, repeats)
                return {**row, **scored(teacher, "teacher")}, predictions, greedy_continuations(teacher, tokenizer,
                                                                                                 prompts)

            # The same teacher on the same held-out text measures the same every run: measured once, then reused.
            what = {"model": model_files_key(self.teacher_path), "dtype": str(next(teacher.parameters()).dtype),
                    "eval": corpus.eval_key(), "prompts": prompts, "vocab": self.vocab, "repeats": repeats,
                    "device": str(device), **benchmark_key(recipe, problems)}
            rows["teacher"], teacher_predictions, samples["teacher"] = remembered(what, measure_teacher)
        else:
            rows["teacher"] = {**cached.read_teacher_eval(Path(recipe.teacher.cache.path)),  # type: ignore[union-attr]
                               "from_cache": True}
            teacher_predictions = cached.eval_predictions(self.cache, len(corpus.eval), recipe.data.seq_len)
        speeds: dict[tuple, dict[str, Any]] = {}  # the students of a run differ only in their weights
        for arm, folder in [("student_init", self.init)] + [(a, arm_folder(self.ctx.run_dir, a)) for a in recipe.arms]:
            model = load_student_folder(folder, device)
            shape = architecture(model)
            rows[arm], _ = measure_lm(model, folder, self.eval_batches, self.vocab, teacher_predictions, tokenizer,
                                      repeats, speed=speeds.get(shape))
            rows[arm].update(scored(model, arm))
            speeds.setdefault(shape, rows[arm])
            if arm != "student_init":
                samples[arm] = greedy_continuations(model, tokenizer, prompts)
        self.generations = [{"prompt": p, **{name: texts[i] for name, texts in samples.items()}}
                            for i, p in enumerate(prompts)]
        return rows

    def summary_fields(self) -> dict[str, Any]:
        return {"method": self.ctx.recipe.method, "generations": self.generations,
                "eval_tokens": sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in self.eval_batches),
                "vocab_compared": self.vocab,
                "teacher_source": "cache" if self.cache is not None else "live"}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.ctx.recipe.method not in RESPONSE_METHODS:
            return summary
        summary["arms"] = response_perplexities(summary["arms"], self.ctx.run_dir, self.ctx.recipe, self.tokenizer,
                                                self.vocab, self.ctx.device)
        summary["metrics"].append("response_perplexity")
        return write_summary(self.ctx.run_dir, summary)


CAUSAL_LM = CausalLMTask()
