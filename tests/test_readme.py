"""The README's Python examples run as written: every ```python block of its "Python API" section that calls
distil.distill(), with tiny models in `teacher_dir` (a Llama) and `encoder_dir` (a BERT)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def distill_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    return [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "distil.distill(" in block]


@pytest.fixture
def encoder_dir(tiny_bert):
    return tiny_bert


def write_chats(folder: Path) -> None:
    lines = []
    for i in range(8):
        messages = [{"role": "user", "content": f"Speak line {i}."},
                    {"role": "assistant", "content": f"To be, or not to be, {i} times."}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    (folder / "chats.jsonl").write_text("".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory):
    """A tiny LM whose tokenizer is not tiny_lm's (640 tokens against 384)."""
    from tests.conftest import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("other-lm"), vocab=640, seed=5)


def test_there_is_one_example_per_task():
    examples = distill_examples()
    assert len(examples) == 5
    assert [("AutoModelForCausalLM" in e, "AutoModel," in e) for e in examples] == [
        (False, False), (True, False), (False, True), (True, False), (True, False)]
    assert "load_lm_dataset" in examples[3] and "student_tokenizer" in examples[4]


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4],
                         ids=["classifier", "causal_lm", "encoder", "own-chat-data", "two-tokenizers"])
def test_readme_example_runs(index, tiny_lm, chat_lm, encoder_dir, other_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_chats(tmp_path)
    code = distill_examples()[index]
    names = {"teacher_dir": chat_lm if index == 3 else other_lm if index == 4 else tiny_lm,
             "student_dir": tiny_lm, "encoder_dir": encoder_dir}
    exec(compile(code, f"README.md example {index}", "exec"), names)
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file() and (run / "report.html").is_file()
    assert (run / "student" / "config.json").is_file()
    printed = capsys.readouterr().out.split()
    assert printed and all(value == value for value in map(float, printed[:1]))  # a number, not NaN

    # The same call again resumes: the trained student is read back, nothing is trained twice.
    lines = (run / "metrics.jsonl").read_text()
    exec(compile(code, f"README.md example {index}", "exec"), names)
    assert (run / "metrics.jsonl").read_text() == lines
