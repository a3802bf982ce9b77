"""Rows of a user's dataset: JSONL, JSON, parquet and CSV files (paths or globs) or a Hugging Face `datasets` folder
(`save_to_disk`), read offline into a list of dicts, with one-line errors that name the file (and line) at fault.

JSONL is read line by line so that a malformed line is reported with its number; parquet through pyarrow and
folders through `datasets.load_from_disk` (both come with `datasets`, part of distil[llm]).
"""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import Any

from distil.errors import DistilError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def resolve_paths(patterns: str | list[str], what: str = "data.path") -> list[Path]:
    """Files (or one `save_to_disk` folder) named by paths or globs, in a stable order; an error names what matched
    nothing."""
    found: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        paths = [Path(m) for m in matches if Path(m).exists()]
        if not paths:
            raise DistilError(f"{what}: {pattern} matches no file")
        found += paths
    for path in found:
        if path.is_dir() and not is_dataset_folder(path):
            raise DistilError(f"{what}: {path} is a folder but not a Hugging Face dataset saved with save_to_disk "
                              f"(no dataset_info.json or state.json); give files ending in {', '.join(SUFFIXES)}")
        if path.is_file() and path.suffix.lower() not in SUFFIXES:
            raise DistilError(f"{what}: {path} is not a JSONL, JSON, parquet or CSV file (by its suffix)")
    return found


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def read_rows(paths: list[Path], split: str | None = None) -> list[dict[str, Any]]:
    """Every row of every file, in order."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += _read(path, split)
    return rows


def _read(path: Path, split: str | None) -> list[dict[str, Any]]:
    if path.is_dir():
        return _read_folder(path, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
            raise DistilError(f"{path}: not a readable parquet file ({exc})") from None
    text = _text(path)
    if suffix == ".jsonl":
        return _jsonl(path, text)
    if suffix == ".json":
        return _json(path, text)
    return list(csv.DictReader(io.StringIO(text, newline="")))  # quoted fields may span lines


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DistilError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None


def _jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistilError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DistilError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DistilError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list of records inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DistilError(f"{path}: a JSON file must hold a list of records (or an object with one such list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DistilError(f"{path}: a JSON file must hold a list of records (objects)")
    return data


def _read_folder(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in loaded else None
        if split not in loaded:
            raise DistilError(f"{path} holds the splits {sorted(loaded)}; choose one with data.split")
        loaded = loaded[split]
    return loaded.to_list()
