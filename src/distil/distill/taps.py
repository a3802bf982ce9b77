"""Taps: capture intermediate module outputs (or inputs) by name with forward hooks, without touching model code.

    with Taps(model, ["model.layers.*.mlp"]) as taps:
        model(x)
    h = taps["model.layers.0.mlp"]

Names are exact `named_modules()` names or glob patterns: `*` matches within one dotted component
(`model.layers.*` is the layers themselves, not their submodules), `**` matches across components (`**.mlp` finds every
`mlp`), `?` one character, `[...]` a character class. Hooks are removed when the
block exits, also on an exception. Captured tensors keep their autograd graph (the student's features need it); under
`torch.no_grad()` there is no graph to keep, so the teacher's taps cost only the tensors themselves.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from distil.errors import DistilError

if TYPE_CHECKING:
    from typing_extensions import Self

_GLOB_CHARS = set("*?[")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """fnmatch-style glob over dotted names, where a single `*` does not cross a dot and `**` does."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _suggest(name: str, names: Sequence[str]) -> str:
    # A glob is compared with its wildcards replaced by a plausible index so `layer.*.mlp` finds `layers.0.mlp`.
    probe = name.replace("*", "0").replace("?", "0")
    close = difflib.get_close_matches(probe, names, n=5, cutoff=0.5)
    if not close:
        tail = probe.rsplit(".", 1)[-1]
        close = [n for n in names if n.rsplit(".", 1)[-1] == tail][:5]
    return ("close matches: " + ", ".join(close)) if close else f"the model has modules such as: {', '.join(names[:5])}"


def resolve_module_names(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Expand exact names and glob patterns into module names, in `named_modules()` order, without duplicates.

    A name that is not a module, or a pattern that matches nothing, raises DistilError with close matches.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise DistilError("no module names given to tap; pass at least one name or pattern such as 'model.layers.*'")
    all_names = _module_names(model)
    known = set(all_names)
    wanted: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            raise DistilError(f"module name {name!r} is not a non-empty string; use names from model.named_modules()")
        if _GLOB_CHARS & set(name):
            regex = _glob_regex(name)
            hits = [n for n in all_names if regex.match(n)]
            if not hits:
                raise DistilError(f"pattern {name!r} matches no module of {type(model).__name__}; "
                                  f"{_suggest(name, all_names)}")
            wanted.update(hits)
        elif name in known:
            wanted.add(name)
        else:
            raise DistilError(f"{type(model).__name__} has no module named {name!r}; {_suggest(name, all_names)}")
    return [n for n in all_names if n in wanted]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's output: the tensor itself, or the first one in a tuple, list or dict.

    Hugging Face layers return tuples (hidden states first) and models return ModelOutput (an ordered dict)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class HookGroup:
    """Forward hooks owned as a group: `_register` adds them (returning their handles); `attach` removes those already
    added when one fails, and `remove` (also on leaving a `with` block) takes them all off the model."""

    _already_attached = "these hooks are already attached; use one `with` block at a time"

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _register(self) -> Iterator[torch.utils.hooks.RemovableHandle]:
        raise NotImplementedError

    def attach(self) -> Self:
        if self._handles:
            raise DistilError(self._already_attached)
        try:
            for handle in self._register():
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)


class Taps(HookGroup):
    """Context manager that records the output (or input) of the named modules on every forward call.

    Args:
        model: any nn.Module.
        names: exact module names or glob patterns (see `resolve_module_names`).
        capture: "output" (default) or "input" (the first tensor among the positional arguments, else the
            `hidden_states` keyword, else the first tensor keyword).
        detach: store detached tensors (for a teacher run with grad enabled, or for logging).

    Only the most recent call of each module is kept, so a module used twice in one forward keeps the second call.
    """

    _already_attached = "these taps are already attached; use one `with Taps(...)` block at a time"

    def __init__(
        self,
        model: nn.Module,
        names: str | Sequence[str],
        *,
        capture: Literal["output", "input"] = "output",
        detach: bool = False,
    ) -> None:
        if capture not in ("output", "input"):
            raise DistilError(f"capture must be 'output' or 'input', got {capture!r}")
        self.model = model
        self.capture = capture
        self.detach = detach
        self.names: list[str] = resolve_module_names(model, names)
        self._values: dict[str, torch.Tensor] = {}
        super().__init__()

    # -- hooks ------------------------------------------------------------------------------------------------
    def _store(self, name: str, value: torch.Tensor | None, what: str) -> None:
        if value is None:
            raise DistilError(f"module {name!r} produced no tensor {what} to tap; tap a submodule that returns a tensor")
        self._values[name] = value.detach() if self.detach else value

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store(name, first_tensor(output), "output")
        return hook

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            value = first_tensor(args)
            if value is None:
                value = kwargs.get("hidden_states")
                value = value if isinstance(value, torch.Tensor) else first_tensor(kwargs)
            self._store(name, value, "input")
        return hook

    def _register(self) -> Iterator[torch.utils.hooks.RemovableHandle]:
        modules = dict(self.model.named_modules())
        for name in self.names:
            if self.capture == "output":
                yield modules[name].register_forward_hook(self._output_hook(name))
            else:
                yield modules[name].register_forward_pre_hook(self._input_hook(name), with_kwargs=True)

    # -- results ----------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._values:
            return self._values[name]
        if name in self.names:
            raise DistilError(f"module {name!r} has not run since the taps were attached; "
                              "call the model inside the `with Taps(...)` block first")
        raise DistilError(f"{name!r} is not tapped; tapped modules: {', '.join(self.names)}")

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(n for n in self.names if n in self._values)

    def __len__(self) -> int:
        return len(self._values)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, self._values[n]) for n in self]

    def clear(self) -> None:
        """Drop the captured tensors (and the graphs they hold) without removing the hooks."""
        self._values.clear()
