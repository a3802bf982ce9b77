"""Images for image classifiers: a folder of class folders of PNG/JPEG files, read with Pillow, optionally resized,
standardised per channel with the training images' statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track

from distil.config.schema import ImageFolderData
from distil.data.sources.base import DataSource, LoadedData
from distil.data.sources.labelled import class_folders, loaded_classification, path_problems, split_data, statistics
from distil.errors import DistilError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_images(spec: ImageFolderData, folder: str, what: str) -> tuple[torch.Tensor, list[str]]:
    """(images [N, C, H, W] float32 in [0, 1], class names) of every file under `folder`'s class folders."""
    from PIL import Image, UnidentifiedImageError

    files = [(name, path) for name, paths in class_folders(Path(folder).expanduser(), SUFFIXES, what).items()
             for path in paths]
    mode = "L" if spec.channels == 1 else "RGB"
    arrays, first = [], None
    for name, path in track(files, description=f"reading {len(files):,} images", transient=True,
                            disable=len(files) < 2000):
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if spec.size is not None:
                    image = image.resize((spec.size[1], spec.size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise DistilError(f"{what}: {path} is not a readable image ({exc}); remove or replace it") from None
        if first is None:
            first = (path, array.shape)
        elif array.shape != first[1]:
            raise DistilError(f"{what}: {path} is {array.shape[1]}x{array.shape[0]} but {first[0]} is "
                              f"{first[1][1]}x{first[1][0]}; set data.size: [height, width] to resize every image")
        arrays.append(array if array.ndim == 3 else array[:, :, None])
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, [name for name, _ in files]


def load_images(spec: ImageFolderData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    data = split_data(spec, seed, read_images)
    if spec.mean is not None and spec.std is not None:  # a pretrained model's own statistics
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (spec.mean, spec.std))
    else:
        mean, std = statistics(data.train_x, (0, 2, 3))
    data.train_x, data.test_x = (data.train_x - mean) / std, (data.test_x - mean) / std
    data.pixel_stats = (mean.flatten().tolist(), std.flatten().tolist())  # an exported model's image processor
    return loaded_classification(data)


def _check_folder(folder: str, key: str) -> None:
    if not Path(str(folder)).expanduser().is_dir():
        raise DistilError(f"{key}: {folder} is not a folder; give a folder with one sub-folder per class")


SOURCE = DataSource(problems=lambda spec: path_problems(spec, _check_folder), load=load_images)
