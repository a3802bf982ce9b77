"""Early exits for deep supervision ("Be Your Own Teacher", Zhang et al. 2019).

An exit reads the output of a shallower block (by module name, through a forward hook: the classifier's code is not
touched) and has a bottleneck that maps it to the width of the deepest features -- the input of the classifier's
last linear layer -- and a linear classifier on top. The exits are an nn.Module of their own: trained and
checkpointed with the student, never saved with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distil.distill.taps import Taps, resolve_module_names
from distil.errors import DistilError


def final_linear_name(model: nn.Module) -> str:
    """The classifier's last linear layer: its input is the deepest features."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise DistilError(f"{type(model).__name__} has no linear classifier layer; deep supervision needs one")
    return names[-1]


def default_exits(model: nn.Module) -> list[str]:
    """The output of every block but the last: conv blocks of a CNN (`features`), hidden layers of an MLP."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        starts = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Conv2d)]
        ends = [i - 1 for i in starts[1:]]
        return [f"features.{children[i][0]}" for i in ends]
    if isinstance(model, nn.Sequential):
        children = list(model.named_children())
        linears = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
        return [children[i - 1][0] for i in linears[1:-1]]  # the activation feeding each hidden linear but the last
    raise DistilError(f"no default exits for {type(model).__name__}; list module names in "
                      "self_distill.deep_supervision.exits")


class ExitHead(nn.Module):
    """Block output -> bottleneck features [N, F] (compared with the deepest features) -> logits [N, classes]."""

    def __init__(self, in_shape: Sequence[int], feature_dim: int, num_classes: int) -> None:
        super().__init__()
        if len(in_shape) == 4:  # feature map [N, C, h, w]
            channels = int(in_shape[1])
            self.bottleneck = nn.Sequential(
                nn.Conv2d(channels, 2 * channels, 1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * channels, feature_dim), nn.ReLU(),
            )
        elif len(in_shape) == 2:
            self.bottleneck = nn.Sequential(nn.Linear(int(in_shape[1]), feature_dim), nn.ReLU())
        else:
            raise DistilError(f"an exit needs a feature map [N, C, h, w] or features [N, D], got {list(in_shape)}")
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.bottleneck(x)
        return features, self.classifier(features)


class Exits(nn.Module):
    """One ExitHead per tapped module, in model order."""

    def __init__(self, names: Sequence[str], heads: Sequence[ExitHead]) -> None:
        super().__init__()
        self.names = list(names)
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.names)


def build_exits(model: nn.Module, example: torch.Tensor, num_classes: int, names: Sequence[str] | None = None) -> Exits:
    """Exits on `names` (default: every block but the last), sized by one forward pass on `example`."""
    chosen = resolve_module_names(model, list(names)) if names else default_exits(model)
    if not chosen:
        raise DistilError(f"{type(model).__name__} has a single block: deep supervision needs exits on shallower "
                          "blocks; use a deeper student (e.g. more channels entries) or list exits explicitly")
    last = final_linear_name(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Taps(model, chosen) as outs, Taps(model, [last], capture="input") as ins:
            model(example)
    finally:
        model.train(was_training)
    feature_dim = int(ins[last].flatten(1).shape[1])
    heads = [ExitHead(tuple(outs[name].shape), feature_dim, num_classes) for name in chosen]
    param = next(model.parameters())
    return Exits(chosen, heads).to(param.device)


def exit_outputs(model: nn.Module, exits: Exits, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(model logits, deepest features, [(exit features, exit logits) per exit]) in one forward pass."""
    with Taps(model, exits.names) as outs, Taps(model, [final_linear_name(model)], capture="input") as ins:
        logits = model(x)
    deepest = ins[ins.names[0]].flatten(1)
    return logits, deepest, [head(outs[name]) for name, head in zip(exits.names, exits.heads)]


@torch.inference_mode()
def exit_accuracies(model: nn.Module, exits: Exits, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    batch: int = 1000) -> dict[str, float]:
    """Test accuracy of every exit, shallowest first, and of the model's own (deepest) classifier as `output`."""
    modes = (model.training, exits.training)
    model.eval()
    exits.eval()
    correct = torch.zeros(len(exits) + 1, dtype=torch.long)
    try:
        for i in range(0, len(y), batch):
            logits, _, outs = exit_outputs(model, exits, x[i : i + batch].to(device))
            target = y[i : i + batch].to(device)
            for j, (_, exit_logits) in enumerate(outs):
                correct[j] += int((exit_logits.argmax(-1) == target).sum())
            correct[-1] += int((logits.argmax(-1) == target).sum())
    finally:
        model.train(modes[0])
        exits.train(modes[1])
    names = exits.names + ["output"]
    return {name: int(c) / len(y) for name, c in zip(names, correct)}
