"""LoRA students (the `peft` library): low-rank adapters on a student's linear layers are all that trains.

The adapters are injected in place, so every objective sees the student model it always does (its LM head and final
hidden states for the fused losses); `AdaptersOnly` makes checkpoints hold the adapters alone (the frozen weights are
the initial student's, on disk), and `merged` folds them into a plain model for evaluation and export.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Lora:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"  # peft's name for every linear layer but the LM head


def with_lora(model: nn.Module, lora: Lora) -> Any:
    """`model` with LoRA adapters injected (only they require grad), wrapped in peft's PeftModel; the model itself,
    adapters inside, is `wrapper.base_model.model`. The adapters' initial A matrices come from torch's RNG."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers 5 for a renamed attribute: nothing a user can change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, config)


class AdaptersOnly(nn.Module):
    """A model whose checkpointed state is its trainable parameters only (a LoRA student's adapters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def trained(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: p.detach() for name, p in self.trained().items()}

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        params = self.trained()
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise RuntimeError(f"the checkpoint's adapters do not match this LoRA student (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}): was it written with other lora settings?")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return None


def adapter_files(wrapper: Any, base_folder: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The adapters' weights and config as `save_pretrained` writes them, the base named by its folder; taken before
    merging (which removes the adapters)."""
    from peft import get_peft_model_state_dict

    config = wrapper.peft_config["default"]
    config.base_model_name_or_path = str(base_folder.resolve())
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(wrapper).items()}, config


def write_adapter(folder: Path, weights: dict[str, torch.Tensor], config: Any) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))


def merged(wrapper: Any) -> nn.Module:
    """The plain model with the adapters folded into its weights (W + B A * alpha / r)."""
    return wrapper.merge_and_unload()
