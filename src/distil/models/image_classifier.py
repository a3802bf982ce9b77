"""Hugging Face image classifiers (AutoModelForImageClassification) for task classification on image folders.

An `ImageClassifier` takes the images as distil's data section prepared them ([N, C, H, W], resized to data.size,
standardised per channel). Saved, it is a plain Hugging Face folder whose image processor repeats that preparation
(resize, rescale to [0, 1], the same mean and std), so `pipeline("image-classification")` predicts what distil
evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.errors import DistilError
from distil.models.classifier_folders import is_fine_tuned


class ImageClassifier(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits

    def save(self, folder: Path, pixel_stats: tuple[list[float], list[float]] | None,
             size: tuple[int, int] | None) -> None:
        from transformers import ViTImageProcessor

        self.model.save_pretrained(folder)
        if pixel_stats is None:
            return
        mean, std = pixel_stats
        ViTImageProcessor(  # PIL bilinear resize, /255, standardise: what data.kind images does
            do_resize=size is not None, size={"height": size[0], "width": size[1]} if size else None, resample=2,
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=mean, image_std=std,
        ).save_pretrained(folder)


def load_image_classifier(path: Path, labels: list[str], input_shape: tuple[int, ...], *,
                          trust_remote_code: bool = False) -> tuple[ImageClassifier, bool]:
    """The model at `path` as a classifier over `labels` reading [C, H, W] images: (model, already fine-tuned?). A
    fine-tuned image classifier must have exactly these labels; any other vision backbone gets a new head."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from distil.models.hf import quiet_transformers

    quiet_transformers()
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    check_input_shape(config, input_shape, path)
    if is_fine_tuned(config, labels, path):
        return ImageClassifier(AutoModelForImageClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code)), True
    model = AutoModelForImageClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        trust_remote_code=trust_remote_code)
    return ImageClassifier(model), False


def check_input_shape(config: Any, input_shape: tuple[int, ...], path: Path) -> None:
    """The images' channels and size against what the model reads, with the data setting that fixes a mismatch."""
    channels, height, width = input_shape
    wanted = getattr(config, "num_channels", None)
    if wanted is not None and wanted != channels:
        raise DistilError(f"{path} reads {wanted}-channel images, the data has {channels}; set data.channels: "
                          f"{wanted}")
    size = getattr(config, "image_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else None
    if size is not None and size != (height, width):
        raise DistilError(f"{path} reads {size[0]}x{size[1]} images, the data's are {height}x{width}; set data.size: "
                          f"[{size[0]}, {size[1]}]")


def load_saved_image_classifier(folder: Path) -> ImageClassifier:
    from transformers import AutoModelForImageClassification

    from distil.models.hf import quiet_transformers

    quiet_transformers()
    return ImageClassifier(AutoModelForImageClassification.from_pretrained(folder)).eval()
