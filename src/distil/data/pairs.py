"""Pair batches: the same examples read by a student and a teacher with different tokenizers, and their aligned
positions (distil.data.alignment), for cross-tokenizer distillation (distil.distill.cross_tokenizer).

An example is a plain text, optionally with the character where its trained part starts (a prompt before it is
context), or a conversation, rendered by each model's own chat template: the messages' contents are the shared
text, aligned piece by piece, and each model's labels are its assistant turns (distil.data.formats.chat_example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distil.data.alignment import Alignment, Span, align, align_offsets, token_ends, tokenize_with_offsets
from distil.data.formats import IGNORE, chat_example, render
from distil.errors import DistilError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PairRow:
    """One example in both tokenizations: ids, labels (-100: context) and the aligned positions whose student
    target is trained."""

    student_ids: list[int]
    teacher_ids: list[int]
    alignment: Alignment
    student_labels: list[int]
    teacher_labels: list[int]


def _trained_positions(alignment: Alignment, student_labels: list[int]) -> Alignment:
    """The aligned positions that predict a trained student token."""
    if not len(alignment):
        return alignment
    keep = torch.tensor(student_labels)[alignment.student + 1] != IGNORE
    return Alignment(alignment.student[keep], alignment.teacher[keep], alignment.teacher_next[keep])


def text_pair(text: str, student_tokenizer: Any, teacher_tokenizer: Any, *, max_length: int,
              trained_from: int = 0) -> PairRow:
    """A plain text in both tokenizations; tokens that start before character `trained_from` are context."""
    student = tokenize_with_offsets(student_tokenizer, text, max_length=max_length)
    teacher = tokenize_with_offsets(teacher_tokenizer, text, max_length=max_length)
    alignment = align_offsets(len(text), student, teacher)

    def labels(ids: list[int], offsets: list[Span]) -> list[int]:
        return [IGNORE if begin < trained_from else token for token, (begin, _) in zip(ids, offsets)]

    s_labels, t_labels = labels(*student), labels(*teacher)
    if trained_from > 0:
        alignment = _trained_positions(alignment, s_labels)
    return PairRow(student[0], teacher[0], alignment, s_labels, t_labels)


def content_spans(rendered: str, messages: Messages, who: str, tokenizer: Any = None) -> list[Span]:
    """Where each message's content sits in one model's rendering of the conversation, in order; with `tokenizer`,
    each is looked for after the rendering of the messages before it (not inside a default system prompt)."""
    spans, position = [], 0
    for number, message in enumerate(messages, 1):
        if tokenizer is not None and number > 1:
            before = _prefix_render(tokenizer, messages[: number - 1])
            if before is not None and rendered.startswith(before):
                position = max(position, len(before))
        start = rendered.find(message["content"], position)
        if start < 0:
            raise DistilError(f"the {who}'s chat template changes the text of message {number} ({message['role']}), "
                              "so the two renderings cannot be aligned on it; use format prompt_completion")
        spans.append((start, start + len(message["content"])))
        position = start + len(message["content"])
    return spans


def _prefix_render(tokenizer: Any, messages: Messages) -> str | None:
    try:
        return render(tokenizer, messages)
    except Exception:  # a template that refuses a partial conversation (e.g. one ending on a user turn)
        return None


def chat_pair(messages: Messages, student_tokenizer: Any, teacher_tokenizer: Any, *, max_length: int) -> PairRow:
    """A conversation rendered by each model's chat template: positions aligned inside the messages' contents (a
    position whose next token is template text, such as end of turn, is not aligned), each model's labels on its own
    assistant turns (their end-of-turn tokens included), as distil's chat data has them."""
    sides = []
    for tokenizer, who in ((student_tokenizer, "student"), (teacher_tokenizer, "teacher")):
        example = chat_example(tokenizer, messages, who, max_length)
        rendered = render(tokenizer, messages)
        ids, offsets = tokenize_with_offsets(tokenizer, rendered, add_special_tokens=False, max_length=max_length)
        if ids != example.input_ids[:max_length]:
            raise DistilError(f"the {who}'s tokenizer splits its rendered conversation differently with offsets; "
                              "use format prompt_completion")
        spans = content_spans(rendered, messages, who, tokenizer)
        sides.append((ids, example.labels[:max_length], token_ends(offsets, spans)))
    (s_ids, s_labels, s_ends), (t_ids, t_labels, t_ends) = sides
    alignment = align(s_ends, t_ends)
    # Where a content ends, each model's next token is its own template's (end of turn): not comparable, so the
    # soft term leaves it to the student's CE.
    inside = torch.from_numpy((s_ends[alignment.student.numpy() + 1] >= 0) &
                              (t_ends[alignment.teacher.numpy() + 1] >= 0))
    alignment = Alignment(alignment.student[inside], alignment.teacher[inside], alignment.teacher_next[inside])
    return PairRow(s_ids, t_ids, _trained_positions(alignment, s_labels), s_labels, t_labels)


def collate_pairs(rows: list[PairRow], *, student_pad: int, teacher_pad: int) -> dict[str, torch.Tensor]:
    """Pair rows right-padded into one batch, their aligned positions as flat indices into [B * L]: student_index /
    teacher_index, and for multi-token spellings teacher_span_end (-1 where none) with merge_token, the student token
    the teacher tokens after teacher_index up to teacher_span_end spell."""
    width_s = max(len(row.student_ids) for row in rows)
    width_t = max(len(row.teacher_ids) for row in rows)
    ids = torch.full((len(rows), width_s), student_pad, dtype=torch.long)
    t_ids = torch.full((len(rows), width_t), teacher_pad, dtype=torch.long)
    labels, t_labels = torch.full_like(ids, IGNORE), torch.full_like(t_ids, IGNORE)
    s_mask, t_mask = torch.zeros_like(ids), torch.zeros_like(t_ids)
    s_index, t_index, span_end, merge_token = [], [], [], []
    for b, row in enumerate(rows):
        n_s, n_t, alignment = len(row.student_ids), len(row.teacher_ids), row.alignment
        ids[b, :n_s], labels[b, :n_s], s_mask[b, :n_s] = torch.tensor(row.student_ids), torch.tensor(
            row.student_labels), 1
        t_ids[b, :n_t], t_labels[b, :n_t], t_mask[b, :n_t] = torch.tensor(row.teacher_ids), torch.tensor(
            row.teacher_labels), 1
        nxt = alignment.teacher_next
        spelled = nxt > alignment.teacher + 1  # one teacher token: its mapping (if its string is equal) covers it
        s_index.append(b * width_s + alignment.student)
        t_index.append(b * width_t + alignment.teacher)
        span_end.append(torch.where(spelled, b * width_t + nxt, -1))
        merge_token.append(torch.where(spelled, ids[b, (alignment.student + 1).clamp_max(width_s - 1)], -1))
    return {"input_ids": ids, "attention_mask": s_mask, "labels": labels, "teacher_input_ids": t_ids,
            "teacher_attention_mask": t_mask, "teacher_labels": t_labels, "student_index": torch.cat(s_index),
            "teacher_index": torch.cat(t_index), "teacher_span_end": torch.cat(span_end),
            "merge_token": torch.cat(merge_token)}


def pair_batch(texts: list[str], student_tokenizer: Any, teacher_tokenizer: Any, *, max_length: int,
               student_pad: int, teacher_pad: int, trained_from: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Plain texts in both tokenizations as one batch (`collate_pairs`). With `trained_from` (a character per text,
    e.g. where a completion starts after its prompt), the tokens that start before it are context: not labels
    (student `labels`, teacher `teacher_labels`), and no aligned position predicts them."""
    starts = trained_from if trained_from is not None else [0] * len(texts)
    rows = [text_pair(text, student_tokenizer, teacher_tokenizer, max_length=max_length, trained_from=start)
            for text, start in zip(texts, starts)]
    return collate_pairs(rows, student_pad=student_pad, teacher_pad=teacher_pad)
