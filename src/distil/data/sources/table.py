"""Tables for MLP classifiers: CSV (optionally gzipped) or parquet files with numeric feature columns and a label
column. Rows with an empty label are unlabelled (transfer set only)."""

from __future__ import annotations

import csv
import glob
import gzip
import io
from pathlib import Path
from typing import Any

import torch

from distil.config.schema import TableData
from distil.data.sources.base import DataSource, LoadedData
from distil.data.sources.labelled import is_missing, loaded_classification, path_problems, split_data, standardise
from distil.errors import DistilError

SUFFIXES = (".csv", ".csv.gz", ".parquet")


def table_files(patterns: str | list[str], what: str) -> list[Path]:
    found: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise DistilError(f"{what}: {pattern} matches no file")
        bad = [f for f in files if not f.name.lower().endswith(SUFFIXES)]
        if bad:
            raise DistilError(f"{what}: {bad[0]} is not a table file ({', '.join(SUFFIXES)})")
        found += files
    return found


def _columns_and_rows(path: Path, header: bool) -> tuple[list[str], list[list[Any]]]:
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
            raise DistilError(f"{path}: not a readable parquet file ({exc})") from None
        columns = table.column_names
        data = table.to_pydict()
        return columns, [list(row) for row in zip(*(data[c] for c in columns))]
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DistilError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    if not rows:
        raise DistilError(f"{path}: the file has no rows")
    if header:
        return [c.strip() for c in rows[0]], rows[1:]
    return [str(i) for i in range(len(rows[0]))], rows


def read_table(spec: TableData, patterns: str | list[str], what: str) -> tuple[torch.Tensor, list[Any]]:
    """(features [N, F] float32, raw labels) of every file, the columns named by the spec."""
    features, labels = [], []
    for path in table_files(patterns, what):
        columns, rows = _columns_and_rows(path, spec.header)
        label = spec.label
        if not spec.header and label.lstrip("-").isdigit():
            label = columns[int(label)]  # a negative index counts from the last column
        wanted = spec.features if spec.features is not None else [c for c in columns if c != label]
        missing = [c for c in [label, *wanted] if c not in columns]
        if missing:
            raise DistilError(f"{path}: no column {missing[0]!r}; its columns are {columns[:12]}"
                              + (" ..." if len(columns) > 12 else "") + "; set data.label / data.features")
        at = [columns.index(c) for c in wanted]
        label_at = columns.index(label)
        for number, row in enumerate(rows, 2 if spec.header else 1):
            if len(row) != len(columns):
                raise DistilError(f"{path}:{number}: {len(row)} fields, the header has {len(columns)}")
            try:
                features.append([float(row[i]) for i in at])
            except (TypeError, ValueError):
                bad = next(c for c, i in zip(wanted, at) if not _is_number(row[i]))
                raise DistilError(f"{path}:{number}: column {bad!r} holds {row[columns.index(bad)]!r}, not a number; "
                                  "drop it from data.features") from None
            labels.append(None if is_missing(row[label_at]) else row[label_at])
    if not features:
        raise DistilError(f"{what}: the table has no rows")
    return torch.tensor(features, dtype=torch.float32), labels


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def load_table(spec: TableData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    data = split_data(spec, seed, read_table)
    if spec.standardise:
        data.train_x, data.test_x = standardise(data.train_x, data.test_x, (0,))
    return loaded_classification(data)


SOURCE = DataSource(problems=lambda spec: path_problems(spec, table_files), load=load_table)
