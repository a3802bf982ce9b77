"""What a run writes besides checkpoints: one model folder per arm, each written whole by rank 0 or not at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.diskspace import write_folder
from distil.train import distributed

# Arm -> its folder in the run directory; the recipe's full distillation is the run's `student`.
ARM_FOLDERS = {"distilled": "student", "student_alone": "student_alone", "logit_kd": "logit_kd",
               "born_again": "born_again", "deep_supervision": "deep_supervision", "ema": "ema"}
INIT_FOLDER = "student_init"  # the student before any training, shared by every arm (language models, encoders)


def arm_folder(run_dir: Path, arm: str) -> Path:
    return Path(run_dir) / ARM_FOLDERS[arm]


def is_model_folder(folder: Path) -> bool:
    """Whether the folder holds a saved model (a config.json and safetensors weights); with several processes, rank
    0's answer, since every rank must take the same branch."""
    folder = Path(folder)
    return distributed.agree((folder / "config.json").is_file() and any(folder.glob("*.safetensors")))


def save_model_folder(folder: Path, fill: Callable[[Path], None], needed: Callable[[], int]) -> None:
    """`fill(tmp)` writes the model into a temporary folder that then replaces `folder`, on rank 0 only (the others
    wait; under FSDP gather the weights on every rank before calling this). Refused before writing when the disk
    has less than `needed()` bytes free (sized on rank 0, which alone holds gathered weights)."""
    distributed.on_main(lambda: write_folder(folder, fill, needed()))


def pick_device(name: str) -> torch.device:
    """The device a recipe's `train.device` asks for (this rank's GPU under torchrun)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DistilError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    return distributed.device_for("cuda" if name in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
