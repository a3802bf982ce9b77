"""Built-in small classifiers, built from a recipe's model spec and the dataset's shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from distil.config.schema import CNNSpec, MLPSpec
from distil.errors import DistilError


class MLP(nn.Sequential):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_sizes: list[int], dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)  # math, not torch: also works under `with torch.device("meta")`
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Module):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: list[int], hidden_size: int, dropout: float = 0.0
    ):
        super().__init__()
        in_ch, height, width = input_shape
        blocks: list[nn.Module] = []
        for out_ch in channels:
            blocks += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
            if min(height, width) >= 4:  # small inputs (8x8 digits) keep their resolution in deeper blocks
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(spec: MLPSpec | CNNSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if isinstance(spec, MLPSpec):
        return MLP(input_shape, num_classes, spec.hidden_sizes, spec.dropout)
    if isinstance(spec, CNNSpec):
        if len(input_shape) != 3:
            raise DistilError(f"model arch 'cnn' needs image inputs [C, H, W]; this dataset gives {list(input_shape)}")
        return CNN(input_shape, num_classes, spec.channels, spec.hidden_size, spec.dropout)
    raise DistilError(f"unknown model arch {spec!r}")


def classifier_config(spec: MLPSpec | CNNSpec, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """Everything needed to rebuild the model from its weights file (written beside it as config.json)."""
    return {"spec": spec.model_dump(mode="json"), "input_shape": list(input_shape), "num_classes": num_classes}


def load_classifier(folder: str | Path) -> nn.Module:
    """Rebuild a saved built-in classifier from `config.json` + `model.safetensors` in `folder`."""
    from pydantic import TypeAdapter

    from distil.config.schema import ModelSpec

    from distil.train.checkpoint import load_tensors

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        spec = TypeAdapter(ModelSpec).validate_python(config["spec"])
        model = build_classifier(spec, tuple(config["input_shape"]), config["num_classes"])
    except (ValueError, KeyError, TypeError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
        raise DistilError(f"{folder / 'config.json'} does not describe a distil classifier ({type(exc).__name__}); "
                          "point teacher.checkpoint at a folder a distil run wrote") from None
    try:
        model.load_state_dict(load_tensors(folder / "model.safetensors"))
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3]) or str(exc)
        raise DistilError(f"{folder / 'model.safetensors'} does not match {folder / 'config.json'}: {detail}") from None
    return model.eval()
