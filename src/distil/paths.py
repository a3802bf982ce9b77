"""Where distil keeps files it reuses across runs, and how it writes model folders safely."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

# Libraries whose releases change kernels, defaults and state formats: files written under another major.minor of
# them may load but compute differently, so loading one says so.
RELEASE_CHECKED = ("torch", "transformers")


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


def library_versions() -> dict[str, str]:
    return dict(_library_versions())


@functools.cache  # read once per process: package metadata lookups are slow, and versions do not change
def _library_versions() -> tuple[tuple[str, str], ...]:
    versions = {"python": platform.python_version()}
    for name in ("distil", "torch", "transformers", "safetensors", "pydantic", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tuple(versions.items())


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(re.split(r"[.+]", version)[:2])


def release_mismatch(saved: Mapping[str, str] | None) -> str | None:
    """"torch 2.5.1 (this machine has 2.13.0)" when the versions recorded in a file differ from this machine's in the
    major.minor of torch or transformers; None when they agree or nothing was recorded (files from before versions
    were recorded stay loadable without a warning)."""
    if not saved:
        return None
    here = library_versions()
    changed = [f"{name} {saved[name]} (this machine has {here[name]})" for name in RELEASE_CHECKED
               if name in saved and name in here and _major_minor(saved[name]) != _major_minor(here[name])]
    return " and ".join(changed) or None
