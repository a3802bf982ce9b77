"""Bad input gets one clear line and exit code 2, never a traceback: missing or malformed files, empty datasets, a
batch larger than the data, damaged teacher folders, unwritable output, out of memory, sequences beyond a model's
context."""

from __future__ import annotations

import gzip
import json
import shutil
import struct

import pytest
import torch

import fault_harness
from distil.cli import main
from distil.errors import DistilError
from distil.guards import (
    check_sequence_length,
    context_length,
    dataset_size_problems,
    out_of_memory_message,
    sequence_length_problems,
)
from reliability_runs import Run


def one_error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_missing_and_malformed_recipe_files(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere.yaml")]) == 2
    assert "neither a file nor a built-in recipe" in one_error(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in one_error(capsys)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["validate", str(bad)]) == 2
    assert "not a text file" in one_error(capsys)


def write_idx(path, dims, payload=b""):
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}i", *dims) + payload)


@pytest.mark.parametrize("damage", ["empty", "not gzip", "cut short"])
def test_an_empty_or_damaged_dataset(tmp_path, capsys, damage):
    from distil.data.sources.vision import FASHION_MNIST_FILES

    for key, name in FASHION_MNIST_FILES.items():
        images = "images" in key
        if damage == "empty":
            write_idx(tmp_path / name, [0, 28, 28] if images else [0])
        elif damage == "not gzip":
            (tmp_path / name).write_bytes(b"not a gzip file")
        else:
            write_idx(tmp_path / name, [10, 28, 28] if images else [10], b"\x01" * 7)
    assert main(["validate", "fashion-mnist-kd", f"data.path={tmp_path}"]) == 2
    line = one_error(capsys)
    assert str(tmp_path) in line
    assert {"empty": "the dataset is empty", "not gzip": "not a readable gzip file",
            "cut short": "truncated IDX file"}[damage] in line


def test_a_batch_larger_than_the_data(capsys):
    assert main(["validate", "digits-kd", "train.batch_size=5000", "train.subset=null"]) == 2
    assert "train.batch_size (5000) exceeds the 1348 training examples" in one_error(capsys)


@pytest.mark.parametrize("damage", ["garbled config", "other architecture", "pickle weights"])
def test_a_damaged_teacher_folder(reference, tmp_path, capsys, damage):
    teacher = tmp_path / "teacher"
    shutil.copytree(reference.outputs()[2].parent, teacher)  # the trained teacher in the cache
    if damage == "garbled config":
        (teacher / "config.json").write_text("{ not json")
    elif damage == "other architecture":
        config = json.loads((teacher / "config.json").read_text())
        config["spec"]["hidden_size"] = 32
        (teacher / "config.json").write_text(json.dumps(config))
    else:
        torch.save({"weight": torch.zeros(2)}, teacher / "model.safetensors")
    run = Run(reference.case, tmp_path / "run", tmp_path / "cache")
    assert main(run.run_args(f"teacher.checkpoint={teacher}")) == 2
    line = one_error(capsys)
    assert str(teacher) in line
    assert {"garbled config": "does not describe a distil classifier", "other architecture": "size mismatch",
            "pickle weights": "is a pickle"}[damage] in line


def test_an_output_dir_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "digits-kd", "-q", f"output_dir={blocker}/run"]) == 2
    assert "a-file" in one_error(capsys)


def test_out_of_memory_is_one_line_with_suggestions(tmp_path):
    """A real allocation failure: the child may map only 96 MB more than at its start, and the teacher's hidden layer
    alone needs 256 MB. The estimate (about 1 GB) fits any machine, so the pre-flight check lets it through."""
    run = Run(None, tmp_path / "run", tmp_path / "cache")  # type: ignore[arg-type]
    argv = ["run", "digits-kd", "-q", f"output_dir={run.run_dir}", "teacher.model={arch: mlp, hidden_sizes: [8192, 8192]}"]
    code, child = fault_harness.run(argv, env=run.env, logs=tmp_path / "logs", plan={"address_space_mb": 96})
    output = child.output()
    assert code == 2, output
    assert "Traceback" not in output
    (line,) = [x for x in output.splitlines() if x.startswith("error:")]
    assert line.startswith("error: out of memory, while allocating 0.25 GiB; lower train.batch_size")
    assert "distil estimate RECIPE" in line


def test_out_of_memory_messages_from_each_allocator():
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.15 GiB of which 3.19 GiB is free.")
    assert out_of_memory_message(cuda).startswith("out of GPU memory, while allocating 20 GiB; lower")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory_message(cpu).startswith("out of memory, while allocating 1.05e+06 GiB; lower")
    assert out_of_memory_message(MemoryError()).startswith("out of memory; lower train.batch_size")
    assert out_of_memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_sequence_length_beyond_the_context_of_either_model():
    from transformers import GPT2Config, LlamaConfig

    teacher = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    student = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128)
    assert context_length(teacher) == (256, "max_position_embeddings")
    assert context_length(student)[0] == 128  # GPT-2's n_positions, which transformers also maps to the usual name
    assert context_length({"max_position_embeddings": 512}) == (512, "max_position_embeddings")
    assert sequence_length_problems(128, {"teacher": teacher, "student": student}, key="data.seq_len") == []
    found = sequence_length_problems(200, {"teacher": teacher, "student": student}, key="data.seq_len")
    assert found == ["data.seq_len (200) exceeds the student's context of 128 positions (max_position_embeddings in "
                     "its config); set data.seq_len=128 or less"]
    with pytest.raises(DistilError, match="teacher's context of 256"):
        check_sequence_length(300, {"teacher": teacher}, key="data.seq_len")


def test_dataset_size_problems():
    assert dataset_size_problems(0, 8, what="the training text", key="train.batch_size")[0].startswith(
        "the training text is empty")
    assert dataset_size_problems(5, 8, what="the training text", key="train.batch_size") == [
        "train.batch_size (8) exceeds the 5 examples of the training text; lower train.batch_size to 5 or less"]
    assert dataset_size_problems(8, 8, what="the training text", key="train.batch_size") == []
