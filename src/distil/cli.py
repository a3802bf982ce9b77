"""The `distil` command line: parse, validate, call. Bad input exits with code 2 and one line per problem."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

from distil.errors import ConfigError, DistilError

EXIT_USAGE = 2


def _split_recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`distil run [RECIPE] [key=value ...]`: the first item is the recipe unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args: argparse.Namespace) -> int:
    from distil.config.load import load_recipe
    from distil.runner import run_recipe

    recipe_name, overrides = _split_recipe_and_overrides(args.items)
    recipe = load_recipe(recipe_name, overrides)
    run_recipe(recipe, show_progress=not args.quiet)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from distil.runner import resume_run

    resume_run(Path(args.run_dir), show_progress=not args.quiet)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from distil.config.load import load_recipe, recipe_to_yaml
    from distil.runner import check

    recipe = load_recipe(args.recipe, args.overrides)
    found = check(recipe)
    if found:
        raise ConfigError(found)
    Console().print(recipe_to_yaml(recipe), markup=False, highlight=False, soft_wrap=True)  # no wrapping: valid YAML
    from distil.estimate import estimate_memory
    from distil.tasks import task_of

    task = task_of(recipe.task)
    if hasattr(task, "pairing"):  # which method the teacher-student pair gets (e.g. two tokenizers)
        Console().print(f"# pair: {task.pairing(recipe)}", markup=False, highlight=False, soft_wrap=True)
    if task.estimate is not None:  # as YAML comments: the output stays a valid recipe
        Console().print(estimate_memory(recipe).format(prefix="# "), markup=False, highlight=False, soft_wrap=True)
    Console(stderr=True).print("[green]recipe is valid[/green]")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from distil.config.load import load_recipe
    from distil.estimate import estimate_memory

    recipe = load_recipe(args.recipe, args.overrides)
    Console().print(estimate_memory(recipe).format(), markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml
    from rich.table import Table

    from distil.config.load import DEFAULT_RECIPE, builtin_recipes

    table = Table(title="built-in recipes (distil run NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, path in sorted(builtin_recipes().items()):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        table.add_row(name + (" (default)" if name == DEFAULT_RECIPE else ""), description)
    Console().print(table)
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    from rich.table import Table

    from distil.students import parse_layers, save_student

    result = save_student(
        args.teacher, Path(args.output), layers=parse_layers(args.layers) if args.layers else None,
        num_layers=args.num_layers, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
    )
    mib = lambda v: f"{v / 2**20:.1f} MiB"  # noqa: E731
    table = Table("", "teacher", "student", title=f"student of {args.teacher}")
    for label, cell in [("layers", lambda r: r["num_layers"]), ("hidden size", lambda r: r["hidden_size"]),
                        ("MLP width", lambda r: r["intermediate_size"]),
                        ("attention / KV heads", lambda r: f"{r['num_attention_heads']} / {r['num_key_value_heads']}"),
                        ("parameters", lambda r: f"{r['parameters']:,}"), ("size in memory", lambda r: mib(r["bytes"])),
                        ("size on disk", lambda r: mib(r["disk_bytes"]))]:
        table.add_row(label, str(cell(result["teacher"])), str(cell(result["student"])))
    ratio = result["student"]["parameters"] / result["teacher"]["parameters"]
    table.caption = (f"teacher layers kept: {result['layers']}; {ratio:.1%} of the teacher's parameters; "
                     f"saved to {result['output']}")
    Console().print(table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """The teacher answers prompts: from a recipe (its teacher and generate sections) or from flags."""
    from distil.config.adapt import sampling
    from distil.generate import Sampling, generate_responses
    from distil.models import hf

    hf.quiet_transformers()
    if args.recipe:
        from distil.config.load import load_recipe
        from distil.data.sources.text import load_corpus
        from distil.tasks.response import prompt_pairs

        recipe_name, overrides = _split_recipe_and_overrides([args.recipe, *args.overrides])
        recipe = load_recipe(recipe_name, overrides)
        if recipe.task != "causal_lm" or recipe.generate is None:
            raise DistilError(f"recipe {recipe.name} has no generate section; use a response-distillation recipe")
        source, seed = recipe.teacher.model.source, recipe.seed  # type: ignore[union-attr]
        if recipe.teacher.train is not None:  # the teacher answers as the run would have it: tuned first
            from distil.tasks.artifacts import is_model_folder
            from distil.tasks.causal_lm_teacher import tuned_teacher_folder

            tuned = tuned_teacher_folder(recipe, hf.resolve_model_path(source))
            if not is_model_folder(tuned):
                raise DistilError(f"recipe {recipe.name} fine-tunes its teacher first (teacher.train), and no run has "
                                  f"yet: `distil run {recipe_name} ...` tunes it into {tuned}; or drop teacher.train")
            source = str(tuned)
        spec = sampling(recipe.generate)
        model, tokenizer = hf.load_causal_lm(source, dtype=recipe.teacher.model.dtype)  # type: ignore[union-attr]
        prompts = [p for p, _ in prompt_pairs(recipe, load_corpus(recipe.data, tokenizer), held_out=False)]
        output = Path(args.output or f"{recipe.name}-generations.jsonl")
    else:
        if not (args.teacher and args.prompts):
            raise DistilError("distil generate needs a RECIPE, or --teacher SOURCE and --prompts FILE.jsonl")
        from distil.data.sources.text import read_prompts_file

        spec = Sampling(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample,
                        temperature=args.temperature, top_p=args.top_p)
        source, seed = args.teacher, 0
        prompts = [p for p, _ in read_prompts_file(args.prompts)]
        model, tokenizer = hf.load_causal_lm(source)
        output = Path(args.output or "generations.jsonl")
    records = generate_responses(model, tokenizer, prompts, output, spec=spec, teacher_id=source, seed=seed)
    Console().print(f"{len(records)} answers in {output}")
    return 0


def cmd_cache_build(args: argparse.Namespace) -> int:
    """Run a recipe's teacher once over its data into `teacher.cache.path` (or part i of n with --shard i/n)."""
    from distil.config.load import load_recipe
    from distil.data.sources.text import load_corpus
    from distil.models import hf
    from distil.tasks import causal_lm_cache as cached
    from distil.tasks import task_of
    from distil.tasks.artifacts import pick_device
    from distil.tasks.causal_lm import as_teacher, load_teacher
    from distil.tasks.causal_lm_measure import measure_lm
    from distil.train import distributed

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.teacher.cache is None:
        raise DistilError(f"recipe {recipe.name} has no teacher.cache section; add teacher.cache.path=DIR")
    shard = None  # under torchrun: part rank of world size, and the manifest once every part is done
    if args.shard is not None:
        try:
            part, parts = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise DistilError(f"--shard must be i/n, e.g. 0/2; got {args.shard}") from None
        shard = (part, parts)
    found = task_of(recipe.task).problems(recipe)
    if found:
        raise ConfigError(found)
    if shard is None:
        distributed.init_from_env(recipe.train.device)
    hf.quiet_transformers()
    device = pick_device(recipe.train.device)
    teacher = as_teacher(load_teacher(recipe), recipe, device)
    source = recipe.teacher.model.source  # type: ignore[union-attr]
    tokenizer = hf.load_tokenizer(source)
    corpus = load_corpus(recipe.data, tokenizer)
    result = cached.build_for_recipe(recipe, teacher, tokenizer, corpus, shard=shard,
                                     show_progress=not args.quiet and distributed.is_main())
    if distributed.is_main():
        cached.describe(result, Console())
    if result.complete and distributed.is_main() and not (Path(recipe.teacher.cache.path) / cached.TEACHER_EVAL).exists():
        row, predictions = measure_lm(teacher, hf.resolve_model_path(source), corpus.eval_batches(),
                                      teacher.config.vocab_size, None, tokenizer)
        cached.write_teacher_eval(Path(recipe.teacher.cache.path), row, predictions)
    distributed.shutdown()
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from distil.cache import cache_info, render_cache_info

    Console().print(render_cache_info(cache_info(args.path)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from distil.reporting import build_report

    Console().print(f"report: {build_report(Path(args.run_dir))}", highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distil.export import export_run

    export_run(Path(args.run_dir), args.format, arm=args.arm, quantize=args.quantize, out=args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distil", description="Knowledge distillation: teacher -> student.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe (a YAML path or a built-in name; none = the default recipe)")
    p.add_argument("items", nargs="*", metavar="[RECIPE] [key=value ...]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe and its files without training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("estimate", help="estimate a recipe's peak memory (weights, gradients, optimizer, activations)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("student", help="build a smaller student from a Hugging Face teacher, weights inherited")
    p.add_argument("teacher", help="a local model folder or a built-in model name")
    p.add_argument("-o", "--output", required=True, help="new folder for the student")
    p.add_argument("--layers", help="teacher layers to keep, e.g. 0,2,4,7,9,11")
    p.add_argument("--num-layers", type=int, help="or: this many layers spread evenly (first and last kept)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-key-value-heads", type=int)
    p.set_defaults(func=cmd_student)

    p = sub.add_parser("generate", help="let a teacher answer prompts (resumable JSONL), for response distillation")
    p.add_argument("recipe", nargs="?", help="a response-distillation recipe (its teacher and generate sections)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--teacher", help="without a recipe: model folder or built-in name")
    p.add_argument("--prompts", help="without a recipe: JSONL file with a 'prompt' field per line")
    p.add_argument("-o", "--output", help="JSONL file to write (appended to and resumed if it exists)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("cache", help="offline teacher caches: build once, train many students")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    c = cache_sub.add_parser("build", help="run a recipe's teacher over its data into teacher.cache.path")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.add_argument("--shard", default=None,
                   help="i/n: compute part i of n (one process per part); under torchrun: rank/world, automatic")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_cache_build)
    c = cache_sub.add_parser("info", help="size, bytes per token, teacher, coverage and settings of a cache")
    c.add_argument("path")
    c.set_defaults(func=cmd_cache_info)

    p = sub.add_parser("resume", help="continue an interrupted run")
    p.add_argument("run_dir")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("report", help="(re)build RUN_DIR/report.html and its plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a run's student for deployment (hf, onnx, safetensors)")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["hf", "onnx", "safetensors"])
    p.add_argument("--quantize", choices=["int8"], help="also write a dynamically quantized copy (onnx only)")
    p.add_argument("--arm", default="distilled", help="which model of the run (default: distilled)")
    p.add_argument("-o", "--output", help="output folder (default: RUN_DIR/export/ARM-FORMAT)")
    p.set_defaults(func=cmd_export)
    return parser


def _error(console: Console, message: str, kind: str = "error") -> None:
    # markup=False: messages quote user values such as [0, 2], which rich would read as markup.
    console.print(f"[{'red' if kind == 'error' else 'yellow'}]{kind}:[/] ", end="")
    console.print(message, markup=False, soft_wrap=True)


def entry() -> None:
    """The `distil` command and `python -m distil`: main(), then the process's exit."""
    code = main()
    from distil.train import distributed

    if distributed.launched():
        # One rank of a torchrun job: gloo's worker threads may still be releasing the last collective's tensors
        # when the interpreter finalizes, and a thread that needs the GIL then aborts the whole process (SIGABRT,
        # "terminate called without an active exception"; seen 1 in 12 runs on a loaded 2-core machine, the
        # pytorch #179291 race). Everything a run writes is closed by now: leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`distil run -q recipe a=1`): collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    flags = [e for e in extra if e.startswith("-")]
    if flags or (extra and args.command not in ("run", "validate", "generate", "estimate", "cache")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        target = "items" if args.command == "run" else "overrides"
        if not hasattr(args, target):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, getattr(args, target) + extra)
    err = Console(stderr=True, highlight=False)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: _error(err, str(message), "warning")
        return _call(args, err)


def _call(args: argparse.Namespace, err: Console) -> int:
    from distil.guards import os_error_message, out_of_memory_message
    from distil.train.signals import StopRequested

    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _error(err, problem)
        return EXIT_USAGE
    except DistilError as exc:
        _error(err, str(exc))
        return EXIT_USAGE
    except StopRequested as exc:
        from distil.train import distributed

        run_dir = exc.run_dir or (exc.checkpoint.parents[2] if exc.checkpoint else "RUN_DIR")
        saved = "; checkpoint saved" if exc.checkpoint else ""
        launcher = "torchrun --nproc_per_node N -m " if distributed.launched() else ""
        if distributed.rank_from_env() == 0:  # every rank stopped after the same step; one says so
            err.print(f"stopped at step {exc.step} of '{exc.stage}'{saved}. Continue with: {launcher}distil resume "
                      f"{run_dir}", soft_wrap=True, markup=False)
        return 0
    except KeyboardInterrupt as exc:
        run_dir = getattr(exc, "run_dir", None) or "RUN_DIR"
        err.print(f"interrupted; the last saved checkpoint is intact (distil resume {run_dir} continues from it)",
                  soft_wrap=True, markup=False)
        return 130
    except (MemoryError, RuntimeError) as exc:  # torch's OutOfMemoryError and CPU allocator failures are RuntimeErrors
        message = out_of_memory_message(exc)
        if message is None:
            raise
        _error(err, message)
        return EXIT_USAGE
    except OSError as exc:  # disk full, permissions, a path that vanished: the environment, not the recipe
        _error(err, os_error_message(exc))
        return EXIT_USAGE
    except Exception as exc:  # a library's own error for a full disk (safetensors' SafetensorError): still one line
        from distil.diskspace import disk_full_errno

        if disk_full_errno(exc) is None:
            raise
        _error(err, f"{exc}; free disk space and run the command again")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
