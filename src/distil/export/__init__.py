"""Export a run's student for deployment: `distil export RUN_DIR --format hf|onnx|safetensors [--quantize int8]`.

- `hf`: a Hugging Face folder (`save_pretrained`, with the tokenizer) that plain transformers loads, without distil.
  The model is reloaded from the student's weights and saved again, so nothing used only in training (projectors,
  training info) comes along.
- `safetensors`: weights plus the config that rebuilds the model (`distil.models.vision.load_classifier` for the
  built-in classifiers; a Hugging Face student gives its Hugging Face folder, which is safetensors plus config).
- `onnx`: an ONNX graph with a dynamic batch axis (and sequence axis for language models), checked by running it in
  onnxruntime against PyTorch on the recipe's evaluation data; `--quantize int8` adds a dynamically quantized copy.
  Size, latency at batch 1, throughput at a larger batch and quality of teacher, student, ONNX and int8 student are
  measured on the same inputs and threads, written to `RUN_DIR/export.json`, and the report is rebuilt to show them.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from distil.errors import DistilError
from distil.diskspace import BLOCK, tensor_bytes, write_folder
from distil.reporting import EXPORT_FILE, build_report, read_exports
from distil.train.checkpoint import write_json

FORMATS = ("hf", "onnx", "safetensors")
QUANTIZE = ("int8",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise DistilError(f"{run_dir} has no summary.json: it is not a finished run; "
                          f"finish it with `distil resume {run_dir}` first")
    return json.loads(path.read_text())


def arm_folder(run_dir: Path, summary: dict[str, Any], arm: str) -> Path:
    arms = summary.get("arms", {})
    if arm not in arms:
        raise DistilError(f"arm {arm!r} is not in this run; choose one of: {', '.join(arms)}")
    folder = Path(arms[arm].get("path") or run_dir / ("student" if arm == "distilled" else arm))
    if not (folder / "config.json").is_file():
        raise DistilError(f"{arm}: no model folder at {folder} (config.json missing); was it moved or deleted?")
    return folder


def student_kind(folder: Path) -> str:
    """'classifier' for distil's built-in classifiers, 'hf' for Hugging Face model folders."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if "spec" in config and "input_shape" in config:
        return "classifier"
    if "model_type" in config:
        return "hf"
    raise DistilError(f"{folder}/config.json describes neither a built-in classifier nor a Hugging Face model")


def export_hf(folder: Path, out: Path) -> dict[str, Any]:
    """Reload the student with its own class, save it (and its tokenizer) to `out` with `save_pretrained`."""
    from distil.models.hf import load_model

    model = load_model(folder)
    tokenizer = None
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder(out, fill, tensor_bytes(model.state_dict().values(), files=8))
    notes = [] if tokenizer else [f"{folder} holds no tokenizer, so the export has none; save one beside it"]
    return {"path": str(out), "files": sorted(p.name for p in out.iterdir()), "tokenizer": tokenizer is not None,
            "size_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")), "notes": notes}


def export_safetensors(folder: Path, out: Path) -> dict[str, Any]:
    """Copy a built-in classifier's weights and config; checked by rebuilding the model from the copy."""
    from distil.models.vision import load_classifier

    def fill(tmp: Path) -> None:
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(folder / name, tmp / name)
        load_classifier(tmp)

    write_folder(out, fill, sum((folder / n).stat().st_size + BLOCK for n in ("model.safetensors", "config.json")))
    return {"path": str(out), "files": ["config.json", "model.safetensors"],
            "size_bytes": (out / "model.safetensors").stat().st_size,
            "rebuild": "distil.models.vision.load_classifier(path)"}


def _save_record(run_dir: Path, record: dict[str, Any]) -> None:
    records = [r for r in read_exports(run_dir)
               if (r.get("arm"), r.get("format")) != (record["arm"], record["format"])]
    write_json(run_dir / EXPORT_FILE, {"exports": records + [record]})


def export_run(
    run_dir: str | Path, fmt: str, *, arm: str = "distilled", quantize: str | None = None, out: str | Path | None = None,
    texts: list[str] | None = None, runs: int = 30, console: Console | None = None,
) -> dict[str, Any]:
    """Export `arm` of a finished run as `fmt` into `out` (default RUN_DIR/export/ARM-FMT); return the record that
    is added to RUN_DIR/export.json. `texts` overrides the evaluation texts of a language-model run."""
    console = console or Console()
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise DistilError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise DistilError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
    if quantize is not None and fmt != "onnx":
        raise DistilError(f"--quantize {quantize} applies to --format onnx only")
    summary = _summary(run_dir)
    folder = arm_folder(run_dir, summary, arm)
    kind = student_kind(folder)
    target = Path(out) if out else run_dir / "export" / f"{arm}-{fmt}"
    if fmt == "hf" and kind != "hf":
        raise DistilError(f"--format hf needs a Hugging Face student; {arm} is a built-in classifier "
                          "(use --format safetensors or --format onnx)")
    if fmt == "hf" or (fmt == "safetensors" and kind == "hf"):
        details = export_hf(folder, target)
    elif fmt == "safetensors":
        details = export_safetensors(folder, target)
    else:
        from distil.export import to_onnx

        if kind == "classifier":
            details = to_onnx.classifier(run_dir, summary, arm, folder, target, quantize=quantize, runs=runs)
        else:
            details = to_onnx.causal_lm(run_dir, summary, arm, folder, target, quantize=quantize, runs=runs,
                                        texts=texts)
    record = {"arm": arm, "format": fmt, "quantize": quantize, **details,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _save_record(run_dir, record)
    report = build_report(run_dir)
    for note in record.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}", markup=True, highlight=False)
    console.print(f"exported {arm} as {fmt}{' + ' + quantize if quantize else ''} to {target}; report: {report}")
    check = record.get("check")
    if check and not check["passed"]:
        raise DistilError(f"the ONNX graph's outputs differ from PyTorch's by {check['max_abs_diff']:.3g} "
                          f"(tolerance {check['tolerance']}) on {check['inputs']}; do not deploy {target}")
    return record


__all__ = ["FORMATS", "QUANTIZE", "export_run", "export_hf", "export_safetensors", "student_kind", "arm_folder"]
