"""What the user's classification sources share (tables, image folders, texts): labels mapped to ids, a seeded
stratified held-out split, a seeded sample of the training rows, and class folders found on disk."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil.config.schema import LabelledData
from distil.data.sources.base import ClassificationData, LoadedData, take
from distil.errors import DistilError

UNLABELLED = -1  # the label id of a row without a label: in the transfer set, never in the hard-label term


def is_missing(label: Any) -> bool:
    return label is None or (isinstance(label, str) and not label.strip()) or (
        isinstance(label, float) and math.isnan(label))


def label_text(label: Any) -> str:
    """Labels compare as text: 3, 3.0 and "3" in a CSV are one class."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label).strip()


def label_names(labels: Sequence[Any], given: list[str] | None, where: str) -> list[str]:
    """The label set in id order: `given` (data.labels), else the labels found, sorted (numerically when all are)."""
    found = {label_text(label) for label in labels if not is_missing(label)}
    if given is not None:
        unknown = sorted(found - set(given))
        if unknown:
            raise DistilError(f"{where}: label {unknown[0]!r} is not in data.labels {given}; add it there or fix the "
                              "row")
        return list(given)
    if not found:
        raise DistilError(f"{where}: no row has a label; label some rows (the others become the transfer set)")
    numeric = all(name.lstrip("-").isdigit() for name in found)
    return sorted(found, key=int) if numeric else sorted(found)


def label_ids(labels: Sequence[Any], names: list[str], where: str) -> torch.Tensor:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, label in enumerate(labels):
        if is_missing(label):
            ids.append(UNLABELLED)
            continue
        text = label_text(label)
        if text not in index:
            raise DistilError(f"{where}: row {row}: label {text!r} is not one of the training labels {names}")
        ids.append(index[text])
    return torch.tensor(ids, dtype=torch.int64)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) row indices: `fraction` of each class's labelled rows held out (at least one per class with
    two or more rows); unlabelled rows always train."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in sorted(set(labels.tolist()) - {UNLABELLED}):
        rows = np.flatnonzero(labels.numpy() == c)
        n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held += rng.permutation(rows)[:n].tolist()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[held] = True
    return torch.nonzero(~mask).flatten(), torch.sort(torch.tensor(held, dtype=torch.int64)).values


def class_folders(path: Path, suffixes: tuple[str, ...], what: str) -> dict[str, list[Path]]:
    """{class name: its files, sorted} of a folder of class folders; every class folder must hold some."""
    if not path.is_dir():
        raise DistilError(f"{what}: {path} is not a folder; give a folder with one sub-folder per class")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DistilError(f"{what}: {path} has no class folders; put each class's files in a sub-folder named after "
                          "the class")
    found = {}
    for folder in classes:
        files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise DistilError(f"{what}: class folder {folder} holds no {'/'.join(suffixes)} file; remove it or add "
                              "examples")
        found[folder.name] = files
    return found


def split_data(spec: LabelledData, seed: int, read: Any, where: str = "data.path") -> ClassificationData:
    """Read the training rows (and eval_path's, or a stratified held-out share) with `read(spec, path, key) ->
    (inputs, raw labels)` (`key` names the recipe field in errors), map the labels to ids and build the splits;
    `inputs` are a tensor or a list."""
    inputs, raw = read(spec, spec.path, where)
    names = label_names(raw, spec.labels, where)
    ids = label_ids(raw, names, where)
    if spec.eval_path is not None:
        test_x, test_raw = read(spec, spec.eval_path, "data.eval_path")
        test_y = label_ids(test_raw, names, "data.eval_path")
        keep = torch.nonzero(test_y != UNLABELLED).flatten()
        test_x, test_y = take(test_x, keep), test_y[keep]
        train_idx = torch.arange(len(ids))
    else:
        train_idx, eval_idx = stratified_split(ids, spec.eval_fraction, seed)
        test_x, test_y = take(inputs, eval_idx), ids[eval_idx]
    if spec.max_examples is not None and spec.max_examples < len(train_idx):
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
        train_idx = torch.sort(train_idx[order[: spec.max_examples]]).values
    if len(test_y) == 0:
        raise DistilError(f"{where}: no labelled held-out rows to evaluate on; label more rows or set data.eval_path")
    train_x, train_y = take(inputs, train_idx), ids[train_idx]
    if not bool((train_y != UNLABELLED).any()):
        raise DistilError(f"{where}: every labelled row is held out; lower data.eval_fraction or label more rows")
    return ClassificationData(train_x, train_y, test_x, test_y, len(names), names)


def path_problems(spec: LabelledData, check: Callable[[Any, str], Any]) -> list[str]:
    """Pre-flight of a source's files, loading nothing: `check(path, key)` raises DistilError for a bad data.path or
    data.eval_path (`key`); one problem line per bad one."""
    found = []
    for key, path in (("data.path", spec.path), ("data.eval_path", spec.eval_path)):  # type: ignore[attr-defined]
        if path is None:
            continue
        try:
            check(path, key)
        except DistilError as exc:
            found.append(str(exc))
    return found


def loaded_classification(data: ClassificationData, eval_size: int | None = None) -> LoadedData:
    n = eval_size or len(data.test_y)
    return LoadedData(train=(data.train_x, data.train_y), eval=(take(data.test_x, torch.arange(n)), data.test_y[:n]),
                      collate=data.rows, size=len(data.train_y), corpus=data)


def standardise(train: torch.Tensor, test: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance over `dims` with the training rows' statistics (a constant feature stays 0)."""
    mean, std = statistics(train, dims)
    return (train - mean) / std, (test - mean) / std


def statistics(train: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) over `dims`, kept as dimensions; a constant feature's std is 1."""
    mean, std = train.mean(dim=dims, keepdim=True), train.std(dim=dims, keepdim=True)
    return mean, torch.where(std > 0, std, torch.ones_like(std))
