"""What a Hugging Face classifier folder is: a saved model (config.json with a model_type), and whether it is
already fine-tuned (a sequence or image classification head), which distil uses as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distil.errors import DistilError

FINE_TUNED_HEADS = ("ForSequenceClassification", "ForImageClassification")


def is_classifier(architectures: list[str] | None) -> bool:
    """Whether a config's `architectures` name a fine-tuned sequence or image classifier."""
    return any(str(a).endswith(FINE_TUNED_HEADS) for a in architectures or [])


def is_fine_tuned(config: Any, labels: list[str], path: Path) -> bool:
    """Whether the model of `config` is a fine-tuned classifier, whose labels must then be the data's."""
    if not is_classifier(getattr(config, "architectures", None)):
        return False
    found = [str(config.id2label[i]) for i in range(config.num_labels)]
    if found != labels:
        raise DistilError(f"{path} is a classifier of the labels {found}, the data has {labels}; give data.labels "
                          "in its order, or give its plain backbone to be fine-tuned")
    return True


def is_hf_folder(folder: Path) -> bool:
    """A saved Hugging Face model (its config.json has a model_type), not a built-in distil classifier."""
    return "model_type" in _config(folder)


def is_fine_tuned_folder(folder: Path) -> bool:
    """A local folder holding a fine-tuned sequence or image classifier (used as a teacher as it is)."""
    return is_classifier(_config(folder).get("architectures"))


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
