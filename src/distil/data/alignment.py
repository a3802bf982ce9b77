"""Aligning the positions of two tokenizations of the same text, through character offsets.

A position `i` of a sequence predicts token `i + 1` from the prefix that ends where token `i` ends. A student position
and a teacher position are aligned when their prefixes end at the same character of the shared text: both models have
then read the same text and predict the same continuation, in different vocabularies. A token that ends inside a
character (byte-level BPE splits an emoji or a CJK character into several tokens carrying the same offsets) is no
boundary: only the last token of a character can be aligned.

The shared text may sit at different places in each model's rendering (chat templates differ): `spans` gives, for
each model, the character spans of the shared pieces (the messages' contents), in the same order. Positions whose
prefix ends outside every span are not aligned; a prefix ending exactly at a span's start is (it predicts the first
token of that piece, e.g. an assistant turn's first token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distil.errors import DistilError
from distil.losses.cross_vocab import VocabMap

Span = tuple[int, int]  # [start, end) character offsets in one model's rendering


@dataclass(frozen=True)
class Alignment:
    """Aligned prediction positions of one sequence pair, in increasing order."""

    student: torch.Tensor  # [M] student positions
    teacher: torch.Tensor  # [M] teacher positions
    # [M] for each pair, the teacher position at which the student's next token ends (the teacher's next tokens
    # teacher+1 .. teacher_next spell it), or -1 where that end is inside a teacher token
    teacher_next: torch.Tensor

    def __len__(self) -> int:
        return int(self.student.numel())


def token_ends(offsets: Any, spans: list[Span]) -> np.ndarray:
    """Each token's prefix end in shared-text coordinates, -1 where it lies outside every span or the token is one a
    post-processor added (offsets (0, 0) after the first token). A first token with (0, 0) offsets (BOS) ends at 0."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = offsets[:, 1].copy()
    added = (offsets[:, 0] == 0) & (offsets[:, 1] == 0)
    coordinate = np.full(len(ends), -1, dtype=np.int64)
    base = 0
    for start, end in spans:
        inside = (ends >= start) & (ends <= end)
        coordinate[inside] = base + ends[inside] - start
        base += end - start + 1  # one gap between pieces: the end of one is never the start of the next
    coordinate[added] = -1
    if len(ends) and added[0] and spans and spans[0][0] == 0:
        coordinate[0] = 0  # BOS: the empty prefix of a text that starts at character 0
    return coordinate


def boundaries(ends: np.ndarray) -> np.ndarray:
    """Positions that have a next token and end on a character boundary of the shared text."""
    if len(ends) < 2:
        return np.zeros(0, dtype=np.int64)
    here, after = ends[:-1], ends[1:]
    return np.nonzero((here >= 0) & (after != here))[0]


def align(student_ends: np.ndarray, teacher_ends: np.ndarray) -> Alignment:
    """Aligned positions of two sequences from their tokens' shared-text ends (token_ends)."""
    s_pos, t_pos = boundaries(student_ends), boundaries(teacher_ends)
    common, s_i, t_i = np.intersect1d(student_ends[s_pos], teacher_ends[t_pos], return_indices=True)
    s_sel, t_sel = s_pos[s_i], t_pos[t_i]
    # Where the student's next token ends, in teacher positions: the last teacher token ending there. A next token
    # that is part of a character (more of its bytes follow) ends nowhere the teacher can spell.
    nxt = s_sel + 1
    complete = (nxt + 1 >= len(student_ends)) | (student_ends[np.minimum(nxt + 1, len(student_ends) - 1)] !=
                                                  student_ends[nxt])
    next_end = np.where(complete, student_ends[nxt], -1)
    t_last = {int(e): k for k, e in enumerate(teacher_ends) if e >= 0}  # later tokens overwrite: the last one
    teacher_next = np.array([t_last.get(int(e), -1) if e >= 0 else -1 for e in next_end], dtype=np.int64)
    teacher_next[teacher_next <= t_sel] = -1
    return Alignment(torch.from_numpy(s_sel), torch.from_numpy(t_sel), torch.from_numpy(teacher_next))


def tokenize_with_offsets(tokenizer: Any, text: str, *, add_special_tokens: bool = True,
                          max_length: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text` with a fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise DistilError(f"cross-tokenizer distillation aligns tokens by character offsets, which needs a fast "
                          f"tokenizer; {type(tokenizer).__name__} is not one (load it with use_fast=True)")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        truncation=max_length is not None, max_length=max_length)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def align_text(text: str, student_tokenizer: Any, teacher_tokenizer: Any, *, max_length: int | None = None
               ) -> tuple[list[int], list[int], Alignment]:
    """Both tokenizations of one plain text and their alignment: (student ids, teacher ids, alignment)."""
    s_ids, s_off = tokenize_with_offsets(student_tokenizer, text, max_length=max_length)
    t_ids, t_off = tokenize_with_offsets(teacher_tokenizer, text, max_length=max_length)
    return s_ids, t_ids, align_offsets(len(text), (s_ids, s_off), (t_ids, t_off))


def align_offsets(text_length: int, student: tuple[list[int], list[Span]], teacher: tuple[list[int], list[Span]]
                  ) -> Alignment:
    """The alignment of two tokenizations of one text, each given as (ids, character offsets)."""
    if student == teacher:  # one tokenizer on both sides: every position is shared, even mid-character
        positions = torch.arange(max(len(student[0]) - 1, 0))
        return Alignment(positions, positions, positions + 1)
    spans = [(0, text_length)]
    return align(token_ends(student[1], spans), token_ends(teacher[1], spans))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id spells (None for special and added tokens), for byte-level BPE (GPT-2, Llama 3,
    Qwen, SmolLM2) and SentencePiece-style vocabularies (the ▁ word marker and <0xNN> byte tokens)."""
    import json

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps([backend.get("pre_tokenizer"), backend.get("decoder")])
    special = {int(i) for i in tokenizer.added_tokens_decoder}
    decoder = _byte_decoder()
    spelled: list[bytes | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None:
            spelled.append(None)
        elif byte_level:
            spelled.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token) else None)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            spelled.append(bytes([int(token[3:5], 16)]))
        else:
            spelled.append(token.replace("\u2581", " ").encode())
    return spelled


def _token_keys(tokenizer: Any) -> list[Any]:
    """What identifies each token across vocabularies: its bytes, or for a special or added token its content."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [b if b is not None else ("added", names[i]) for i, b in enumerate(token_bytes(tokenizer))]


def vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """The token pairs of the two vocabularies that spell the same bytes; special and added tokens pair with those
    of the same content (an <|endoftext|> with an <|endoftext|>), never with text."""
    student_ids = {key: i for i, key in enumerate(_token_keys(student_tokenizer))}
    pairs = [(t, student_ids[key]) for t, key in enumerate(_token_keys(teacher_tokenizer)) if key in student_ids]
    t_ids, s_ids = zip(*pairs) if pairs else ((), ())
    return VocabMap(torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long))


def projected_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """`vocab_map`, and every other teacher token that spells bytes paired with the longest student token its bytes
    start with (many teacher tokens to one student token).

    A teacher token the student cannot spell in one piece (Qwen2.5's ':\\n', '():') is text that the student begins
    with that token: the teacher's probability of it is the student's of its first piece. Without this, a code
    teacher's mass on such tokens says nothing of the student's next token, and a KL over equal strings alone
    teaches the student that ':' is unlikely where the teacher writes ':\\n'."""
    exact = vocab_map(student_tokenizer, teacher_tokenizer)
    student_ids = {b: i for i, b in enumerate(token_bytes(student_tokenizer)) if b}
    longest = max((len(b) for b in student_ids), default=0)
    mapped = set(exact.teacher_ids.tolist())
    t_ids, s_ids = exact.teacher_ids.tolist(), exact.student_ids.tolist()
    for t, spelled in enumerate(token_bytes(teacher_tokenizer)):
        if t in mapped or not spelled:
            continue
        for length in range(min(len(spelled) - 1, longest), 0, -1):
            if (s := student_ids.get(spelled[:length])) is not None:
                t_ids.append(t)
                s_ids.append(s)
                break
    return VocabMap(torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long))
