"""Safe loading: distil writes no pickle, never unpickles, and a recipe cannot run code.

- every file a run writes is JSON, YAML, text or safetensors;
- a checkpoint whose weights were replaced by a malicious pickle is refused -- skipped with a warning when its seal
  no longer matches, a clear error when an attacker re-sealed it -- and the payload never runs;
- a recipe carrying a YAML python tag is rejected as invalid YAML, and its payload never runs;
- a scan of src/: `torch.load` only with weights_only=True; no pickle, marshal, shelve, dill or joblib; no unsafe
  YAML loader; no eval/exec; `trust_remote_code` is never passed as a literal True and defaults to False in every
  function signature and recipe schema field.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel
from safetensors import safe_open

import fault_harness
from distil.cli import main
from distil.config import schema
from reliability_runs import Run

SRC = Path(__file__).resolve().parents[2] / "src" / "distil"


class Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def malicious_files(marker: Path, folder: Path) -> dict[str, Path]:
    raw, zipped = folder / "raw.pkl", folder / "torch-save.pt"
    raw.write_bytes(pickle.dumps({"student.0.weight": Payload(marker)}))
    torch.save({"student.0.weight": Payload(marker)}, zipped)
    # The payloads are live: unpickling one does run it.
    probe = folder / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.is_dir()
    return {"pickle": raw, "torch.save": zipped}


def test_every_file_a_run_writes_is_json_yaml_text_or_safetensors(reference):
    files = [p for root in (reference.run_dir, reference.cache) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20
    for file in files:
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle"
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                assert list(f.keys())
        elif file.suffix == ".json" or file.name == "COMPLETE":
            json.loads(file.read_text())
        elif file.suffix == ".jsonl":
            [json.loads(line) for line in file.read_text().splitlines()]
        elif file.suffix == ".yaml":
            yaml.safe_load(file.read_text())
        elif file.suffix == ".png":
            assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        elif file.suffix == ".html":
            assert file.read_text().lstrip().lower().startswith("<!doctype html")
        elif file.name == ".lock":  # the run directory's lock: the pid of the run that held it, as text
            assert file.read_text().strip().isdigit()
        else:
            pytest.fail(f"{file}: a file of unknown format")


def reseal(folder: Path) -> None:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != "COMPLETE"}
    (folder / "COMPLETE").write_text(json.dumps({"files": files}))


@pytest.fixture(scope="module")
def killed_run(make_reference, tmp_path_factory) -> Run:
    """A run killed during step 10 of the distilled arm: its newest checkpoints are step 6 and step 9."""
    reference = make_reference("digits-kd")
    root = tmp_path_factory.mktemp("killed")
    run = Run(reference.case, root / "run", root / "cache")
    during_step_10 = [e[0] for e in reference.events if e[1] == "step" and e[3] == "distilled"][9]
    code, _ = fault_harness.run(run.run_args(), env=run.env, logs=root / "logs", plan={"kill_at": during_step_10})
    assert code == -9
    return run


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("resealed", [False, True])
def test_a_checkpoint_carrying_a_malicious_pickle_is_refused(killed_run, tmp_path, kind, resealed):
    run = Run(killed_run.case, tmp_path / "run", tmp_path / "cache")
    shutil.copytree(killed_run.run_dir, run.run_dir)
    shutil.copytree(killed_run.cache, run.cache)
    marker = tmp_path / "payload-ran"
    newest = run.run_dir / "checkpoints" / "distilled" / "step-00000009"
    shutil.copy(malicious_files(marker, tmp_path)[kind], newest / "modules.safetensors")
    if resealed:  # an attacker who also rewrote the checksums
        reseal(newest)

    code, child = fault_harness.run(run.next_args(), env=run.env, logs=tmp_path / "logs")
    output = child.output()
    assert not marker.exists(), "the payload ran"
    assert "Traceback" not in output
    if resealed:
        assert code == 2
        (line,) = [x for x in output.splitlines() if x.startswith("error:")]
        assert line == (f"error: {newest / 'modules.safetensors'} is a pickle (or torch.save) file, not safetensors; "
                        "distil never loads pickles because unpickling can run code; convert it with "
                        "safetensors.torch.save_file")
    else:
        assert code == 0, output
        assert f"warning: skipping checkpoint step-00000009: {newest / 'modules.safetensors'} is damaged" in output


def test_a_recipe_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.mkdir ['{marker}']\ntask: classification\n")
    assert main(["validate", str(recipe)]) == 2
    assert not marker.exists()
    assert "not valid YAML" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- scanning src/
BANNED_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Everything in `source` that could unpickle, run code, or trust remote code."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{where}: imports {n}" for n in names if n and n.split(".")[0] in BANNED_MODULES]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                    found.append(f"{where}: {node.name}(trust_remote_code=...) does not default to False")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        true = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True  # noqa: E731
        if owner == "torch" and name == "load" and not true("weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            found.append(f"{where}: yaml.{name} (use yaml.safe_load)")
        if isinstance(func, ast.Name) and name in ("eval", "exec"):  # the builtins, not model.eval()
            found.append(f"{where}: {name}()")
        if name == "load" and owner in ("np", "numpy") and true("allow_pickle"):
            found.append(f"{where}: numpy load with allow_pickle=True")
        if true("trust_remote_code"):
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    sample = (
        "import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)\neval('1')\nnp.load(p, allow_pickle=True)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True)\ndef f(x, trust_remote_code=True): pass\n"
        "torch.load(f, weights_only=True)\nyaml.safe_load(s)\nmodel.eval()\n"
    )
    flagged_lines = sorted(int(problem.split(":")[1]) for problem in unsafe_calls(sample))
    assert flagged_lines == [1, 2, 4, 5, 6, 7, 8, 9, 10]  # every line but the three safe ones at the end


def test_src_never_unpickles_runs_code_or_trusts_remote_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [problem for file in files for problem in unsafe_calls(file.read_text(), str(file.relative_to(SRC)))]
    assert found == []


def test_trust_remote_code_defaults_to_false_in_every_recipe_field():
    fields = [(model.__name__, f.default) for model in vars(schema).values()
              if isinstance(model, type) and issubclass(model, BaseModel)
              for name, f in model.model_fields.items() if name == "trust_remote_code"]
    assert fields, "no recipe field trust_remote_code: update this test if the schema renamed it"
    assert all(default is False for _, default in fields), fields
