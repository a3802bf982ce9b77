"""Rows of a language-model dataset -> token examples whose labels say which tokens are trained on.

Formats (the `format` of a data section), each reading named columns with the common conventions as defaults:
- `text`: one document per row (`text`); every token is trained on; the tokenizer's EOS closes each document.
- `prompt_completion`: `prompt` and `completion`; only the completion (and the EOS after it) is trained on.
- `chat`: a `messages` list of {role, content} (OpenAI / TRL), or ShareGPT's `conversations` of {from, value};
  rendered with the tokenizer's chat template; only assistant turns are trained on (each one, with its end-of-turn
  tokens); system, user and tool turns are context.

Labels follow the -100 convention: a label is the token itself where it counts, -100 where it does not, so that
every loss, the fused path and the teacher cache read these examples unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from distil.errors import DistilError

IGNORE = -100
FORMATS = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool"}


@dataclass(frozen=True)
class Columns:
    """Where each format finds its fields (the defaults follow TRL's dataset formats)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"  # a row without it may hold ShareGPT's "conversations" instead


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # the token where it is trained on, IGNORE elsewhere

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Tally:
    """What tokenizing a dataset kept and dropped, printed before training."""

    rows: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows

    def describe(self) -> str:
        kept = self.rows - sum(self.dropped.values())
        text = f"{kept} of {self.rows} examples kept, {self.truncated} truncated to max_length"
        if self.dropped:
            text += "; dropped: " + ", ".join(f"{n} {why}" for why, n in self.dropped.items())
        return text


def to_messages(row: dict[str, Any], columns: Columns, where: str) -> list[dict[str, str]]:
    """A chat row's turns as [{role, content}], ShareGPT's {from, value} mapped to OpenAI roles."""
    if columns.messages in row:
        turns, role_key, content_key, names = row[columns.messages], "role", "content", {r: r for r in ROLES}
    elif "conversations" in row:
        turns, role_key, content_key, names = row["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise DistilError(f"{where}: no '{columns.messages}' (or ShareGPT 'conversations') column; the row has "
                          f"{sorted(row)}; name it with data.columns.messages")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DistilError(f"{where}: '{columns.messages}' must be a list of {{role, content}} objects")
    messages = []
    for turn in turns:
        role = turn.get(role_key)
        if role not in names:
            raise DistilError(f"{where}: unknown role {role!r}; roles are {', '.join(sorted(names))}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DistilError(f"{where}: a '{role}' turn has no text '{content_key}'")
        messages.append({"role": names[role], "content": content})
    return messages


def prompt_length(labels: list[int]) -> int:
    """How many leading tokens are not trained on (an example's prompt: a chat up to its first answer, the prompt
    column); 0 for text, trained on from its first token."""
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))


def text_example(tokenizer: Any, text: str) -> Example:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Example(ids, list(ids))


def prompt_completion_example(tokenizer: Any, prompt: str, completion: str) -> Example:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    answer = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return Example(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_example(tokenizer: Any, messages: list[dict[str, str]], where: str = "conversation",
                 max_length: int | None = None) -> Example:
    """The conversation through the chat template; the characters of each assistant turn (from the end of the
    generation prompt before it to the end of the turn) are found by rendering it prefix by prefix, and the tokens
    that start inside them are trained on. With `max_length`, a long conversation is tokenized only as far as its
    first max_length tokens need (the result is truncated to them anyway)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DistilError("format chat needs a tokenizer with a chat template; this one has none (use format text "
                          "or prompt_completion, or a model with a chat template)")
    text = render(tokenizer, messages)
    encoded, covered = None, len(text)
    if max_length is not None and len(text) > (limit := 6 * (max_length + _MARGIN)):  # ~4 characters a token
        # The tokens of a prefix equal the full text's up to the last few before the cut: keep a margin of them.
        encoded, covered = tokenizer(text[:limit], add_special_tokens=False, return_offsets_mapping=True), limit
        if len(encoded["input_ids"]) < max_length + _MARGIN:  # long tokens: the prefix may not reach max_length
            encoded, covered = None, len(text)
    if encoded is None:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:  # an opening assistant turn answers nothing: context
            continue
        start = render(tokenizer, messages[:i], generation_prompt=True)
        if len(start) >= covered:
            break
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(start) and text.startswith(upto)):
            raise DistilError(f"{where}: the chat template does not render the conversation prefix by prefix (it "
                              "rewrites earlier turns), so the assistant tokens cannot be found; use format "
                              "prompt_completion")
        spans.append((len(start), len(upto)))
    ids = list(encoded["input_ids"])
    labels = [token if any(a <= begin < b for a, b in spans) else IGNORE
              for token, (begin, _) in zip(ids, encoded["offset_mapping"])]
    return Example(ids, labels)


_MARGIN = 16  # tokens


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, fmt: str, *, max_length: int,
                  columns: Columns = Columns(), source: str = "data") -> tuple[list[Example], Tally]:
    """Each row as an Example truncated to max_length, with a tally of what was truncated or dropped (empty rows,
    conversations without an assistant turn, examples left with no trained token)."""
    if fmt not in FORMATS:
        raise DistilError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tally, examples = Tally(rows=len(rows)), []
    for number, row in enumerate(rows, 1):
        where = f"{source} row {number}"
        example = _example(row, tokenizer, fmt, columns, where, tally, max_length)
        if example is None:
            continue
        if len(example.input_ids) > max_length:
            tally.truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if example.trained == 0:
            tally.dropped["with no trained token within max_length"] += 1
            continue
        examples.append(example)
    if not examples:
        raise DistilError(f"{source}: no example left to train on ({tally.describe()})")
    return examples, tally


def _example(row: dict[str, Any], tokenizer: Any, fmt: str, columns: Columns, where: str, tally: Tally,
             max_length: int) -> Example | None:
    if fmt == "chat":
        messages = to_messages(row, columns, where)
        if not any(m["role"] == "assistant" for m in messages):
            tally.dropped["conversations without an assistant turn"] += 1
            return None
        try:
            return chat_example(tokenizer, messages, where, max_length)
        except DistilError:
            raise
        except Exception:  # e.g. a template that demands alternating roles: this row cannot be rendered
            tally.dropped["conversations the chat template cannot render"] += 1
            return None
    values = _plain_values(row, fmt, columns, where)
    if values is None:
        tally.dropped["empty rows"] += 1
        return None
    return text_example(tokenizer, values[0]) if fmt == "text" else prompt_completion_example(tokenizer, *values)


def _plain_values(row: dict[str, Any], fmt: str, columns: Columns, where: str) -> list[str] | None:
    """The text (format text) or the prompt and completion of a row, checked; None for an empty row."""
    names = [columns.text] if fmt == "text" else [columns.prompt, columns.completion]
    missing = [n for n in names if n not in row]
    if missing:
        raise DistilError(f"{where}: no column {', '.join(repr(m) for m in missing)} for format {fmt}; the row has "
                          f"{sorted(row)} (name the columns with data.columns)")
    values = [row[n] for n in names]
    if not all(isinstance(v, str) for v in values):
        raise DistilError(f"{where}: {', '.join(names)} must be text")
    return values if all(v.strip() for v in values) else None


def plain_texts(rows: list[dict[str, Any]], fmt: str, columns: Columns = Columns(), source: str = "data"
                ) -> tuple[list[tuple[str, int]], Tally]:
    """Rows of format text or prompt_completion as (text, trained_from): the whole text and the character where its
    trained part starts (0 for a document, the completion's first character for a prompt-completion pair), for two
    models that tokenize the same text each its own way (distil.data.pairs)."""
    if fmt not in ("text", "prompt_completion"):
        raise DistilError(f"format {fmt} is rendered by each model's own template: only formats text and "
                          "prompt_completion are read as plain text")
    tally, texts = Tally(rows=len(rows)), []
    for number, row in enumerate(rows, 1):
        values = _plain_values(row, fmt, columns, f"{source} row {number}")
        if values is None:
            tally.dropped["empty rows"] += 1
        else:
            texts.append((values[0], 0) if fmt == "text" else (values[0] + values[1], len(values[0])))
    if not texts:
        raise DistilError(f"{source}: no example left to train on ({tally.describe()})")
    return texts, tally
