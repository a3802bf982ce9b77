"""Hugging Face sequence classifiers (AutoModelForSequenceClassification) for task classification on texts.

A `TextClassifier` holds the model and its own tokenizer and takes raw texts (or (text, text_pair) tuples), so a
teacher and a student with different tokenizers read the same examples. Saved, it is a plain Hugging Face folder
(weights, config with id2label, tokenizer with model_max_length = the recipe's max_length) that
`pipeline("text-classification")` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.models.classifier_folders import is_fine_tuned


class TextClassifier(nn.Module):
    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def forward(self, texts: list[Any]) -> torch.Tensor:
        paired = bool(texts) and not isinstance(texts[0], str)
        first = [t[0] for t in texts] if paired else list(texts)
        second = [t[1] for t in texts] if paired else None
        encoded = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model(**{k: v.to(device) for k, v in encoded.items()}).logits

    def save(self, folder: Path) -> None:
        self.tokenizer.model_max_length = self.max_length  # a pipeline truncates where distil did
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def load_text_classifier(path: Path, labels: list[str], max_length: int, *,
                         trust_remote_code: bool = False) -> tuple[TextClassifier, bool]:
    """The model at `path` as a classifier over `labels`: (model, already fine-tuned?). A fine-tuned sequence
    classifier must have exactly these labels; any other encoder gets a new classification head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from distil.models.hf import quiet_transformers

    quiet_transformers()  # its load report lists the new head as missing weights, which is the point here
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if is_fine_tuned(config, labels, path):
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        return TextClassifier(model, tokenizer, max_length), True
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        trust_remote_code=trust_remote_code)
    return TextClassifier(model, tokenizer, max_length), False


def load_saved(folder: Path, max_length: int | None = None) -> TextClassifier:
    """A fine-tuned sequence classifier folder (one distil saved, or the user's), reading at most `max_length`
    tokens (default: its tokenizer's model_max_length, which distil sets to the recipe's)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distil.models.hf import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return TextClassifier(model, tokenizer, max_length or int(tokenizer.model_max_length)).eval()
