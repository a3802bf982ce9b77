"""Data sources: recipe `data.kind` -> how to check and load it into (train, eval, collate) for its task.

A new source or file format is one module here with a `SOURCE` and one entry in SOURCES (plus its section in the
recipe schema, distil.config.schema, which stays free of loading code)."""

from __future__ import annotations

from typing import Any

from distil.data.sources import dataset, images, sentences, table, text, texts, vision
from distil.data.sources.base import DataSource, LoadedData
from distil.errors import DistilError

SOURCES: dict[str, DataSource] = {"vision": vision.SOURCE, "text": text.SOURCE, "dataset": dataset.SOURCE,
                                  "sentences": sentences.SOURCE, "table": table.SOURCE, "images": images.SOURCE,
                                  "texts": texts.SOURCE}

__all__ = ["SOURCES", "DataSource", "LoadedData", "data_problems", "load_data", "source_of"]


def source_of(spec: Any) -> DataSource:
    if spec.kind not in SOURCES:
        raise DistilError(f"unknown data.kind {spec.kind!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[spec.kind]


def data_problems(spec: Any) -> list[str]:
    """Pre-flight checks of a recipe's data section that read no data."""
    return source_of(spec).problems(spec)


def load_data(spec: Any, *, seed: int, tokenizer: Any = None) -> LoadedData:
    """Load a recipe's data section (language sources need the teacher's tokenizer)."""
    return source_of(spec).load(spec, seed=seed, tokenizer=tokenizer)
