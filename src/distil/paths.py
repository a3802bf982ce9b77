"""Where distil keeps files it reuses across runs, and how it writes model folders safely."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where distil keeps what it reuses across runs (trained teachers, converted models): `$DISTIL_CACHE`, else
    `$XDG_CACHE_HOME/distil`, else `~/.cache/distil` (a `~` in either variable is expanded)."""
    if os.environ.get("DISTIL_CACHE"):
        return Path(os.environ["DISTIL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "distil"


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place (the old one, if any, is removed first)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def write_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """Write a folder whole or not at all: `fill(tmp)` writes into a fresh temporary sibling, which then replaces
    `folder`. Temporary and old folders left by a process killed while writing are removed first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        fill(tmp)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("distil", "torch", "transformers", "safetensors", "pydantic", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
