"""Built-in image classification datasets, loaded into memory as float tensors."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil.config.schema import VisionData
from distil.data.sources.base import ClassificationData, DataSource, LoadedData
from distil.data.sources.labelled import loaded_classification
from distil.errors import DistilError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def fashion_mnist_problems(path: str | None) -> list[str]:
    """Pre-flight: the files the loader needs, checked without reading them."""
    folder = Path(path or FASHION_MNIST_DIR)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (folder / name).is_file()]
    if not missing:
        return []
    return [
        f"data.path: Fashion-MNIST file {folder / missing[0]} not found; install the Debian package "
        f"dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) or set data.path=DIR to a folder "
        f"holding {', '.join(FASHION_MNIST_FILES.values())}"
    ]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims as big-endian int32, then uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # not gzip, or cut short
        raise DistilError(f"{path}: not a readable gzip file ({exc}); re-install dataset-fashion-mnist") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise DistilError(f"{path}: not an IDX file of bytes (the MNIST format); re-install dataset-fashion-mnist")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DistilError(f"{path}: truncated IDX file ({data.size} values, expected {int(np.prod(dims))})")
    if data.size == 0:
        raise DistilError(f"{path}: the dataset is empty (no examples); point data.path at the complete files")
    return data.reshape(tuple(int(d) for d in dims))


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics from the training split only, so the test split stays unseen.
    train_f = train.astype(np.float32)
    mean, std = float(train_f.mean()), float(train_f.std())
    to_t = lambda a: torch.from_numpy((a.astype(np.float32) - mean) / std).unsqueeze(1)  # noqa: E731
    return to_t(train), to_t(test)


def load_fashion_mnist(path: str | None = None) -> ClassificationData:
    problems = fashion_mnist_problems(path)
    if problems:
        raise DistilError(problems[0])
    folder = Path(path or FASHION_MNIST_DIR)
    arrays = {key: _read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}
    train_x, test_x = _standardise(arrays["train_images"], arrays["test_images"])
    return ClassificationData(
        train_x,
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x,
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        num_classes=10,
    )


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> ClassificationData:
    """scikit-learn's bundled 8x8 digits (1,797 images), split by a fixed seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DistilError("the digits dataset needs scikit-learn: pip install 'distil[classic]'") from None
    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(len(labels) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_x, test_x = _standardise(images[train_idx], images[test_idx])
    return ClassificationData(
        train_x, torch.from_numpy(labels[train_idx]), test_x, torch.from_numpy(labels[test_idx]), num_classes=10
    )


def load_vision(name: str, path: str | None, seed: int) -> ClassificationData:
    if name == "fashion-mnist":
        return load_fashion_mnist(path)
    if name == "digits":
        return load_digits_data(seed=0)  # a fixed split: every run of every recipe sees the same test set
    raise DistilError(f"unknown vision dataset '{name}'; built-in: fashion-mnist, digits")


def vision_problems(name: str, path: str | None) -> list[str]:
    if name == "fashion-mnist":
        return fashion_mnist_problems(path)
    if name == "digits":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return ["data.name: digits needs scikit-learn: pip install 'distil[classic]'"]
    return []


def _load(spec: VisionData, *, seed: int, tokenizer: Any = None) -> LoadedData:
    return loaded_classification(load_vision(spec.name, spec.path, seed), spec.eval_size)


SOURCE = DataSource(problems=lambda spec: vision_problems(spec.name, spec.path), load=_load)
