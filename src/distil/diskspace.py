"""Writing files when the disk may fill up: a check before writing where the size is known, and one clear line
when the disk fills anyway, instead of a traceback or a half-written file that a later run could take as valid.

Every durable write of distil (checkpoints, teacher-cache shards, model folders) goes through `check_space` and
`disk_full_guard`, or through `write_folder`, which does both for a folder written aside and moved into place.
A write that fails removes its temporary file or folder, so the space it took is free again and what was there
before (the previous checkpoint, the finished shards, the old model folder) is untouched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from distil.errors import DistilError

# No space left, a file-size limit (RLIMIT_FSIZE, `ulimit -f`; SIGXFSZ ignored), a disk quota.
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
BLOCK = 4096  # a file takes whole blocks: count one more per file written, so small files are not underestimated


class DiskFullError(DistilError):
    """The disk (or a size limit) could not take a write. The message says where, how much, and what to do."""

    def __init__(self, path: Path, needed: int, free: int, code: int = errno.ENOSPC, retry: str | None = None):
        self.path, self.needed, self.free, self.code = Path(path), needed, free, code
        self.retry = retry  # what to run once space is freed; None: `distil resume RUN_DIR` when run_dir is set
        self.run_dir: Path | None = None  # set by the run that was writing
        super().__init__(str(path))

    def __str__(self) -> str:
        what = {errno.EFBIG: "file-size limit reached", errno.EDQUOT: "disk quota exceeded"}.get(self.code, "disk full")
        fix = {errno.EFBIG: "raise the limit (ulimit -f)", errno.EDQUOT: "free space in your quota"}.get(
            self.code, "free space")
        then = f"run `distil resume {self.run_dir}`" if self.run_dir else (self.retry or "run the same command again")
        return (f"{what} writing {self.path}: needs ~{human_size(self.needed)}, {human_size(self.free)} free; "
                f"{fix} and {then}")


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def tensor_bytes(tensors: Iterable[torch.Tensor], *, files: int = 1, shared_once: bool = True) -> int:
    """Bytes `tensors` take in safetensors files, plus a block per file for its header. `shared_once`: tensors that
    are views of the same memory (tied weights) count once, as save_pretrained writes them."""
    seen, total = set(), 0
    for t in tensors:
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        except RuntimeError:  # no plain storage (a DTensor shard, a meta tensor): count it
            key = (0,)
        if not shared_once or key not in seen or key[0] == 0:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total + BLOCK * files


def _usage(path: Path) -> tuple[int, int]:
    """(total, free) bytes of the file system that holds `path`, or would hold it: the folder may not exist yet."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)  # free: what an unprivileged writer may still use
    return usage.total, usage.free


def free_bytes(path: Path) -> int:
    return _usage(path)[1]


def check_space(path: Path, needed: int, retry: str | None = None) -> None:
    """Refuse a write of `needed` bytes to `path` before it starts, when the file system has less free."""
    total, free = _usage(path)
    if total > 0 and needed > free:  # total 0: a file system that reports nothing (some FUSE mounts)
        raise DiskFullError(Path(path).absolute(), needed, free, retry=retry)


def disk_full_errno(exc: BaseException) -> int | None:
    """The errno when `exc` (or what caused it) is a disk-full error, else None. safetensors (Rust) reports I/O
    errors as SafetensorError text ("... No space left on device (os error 28)"), not as OSError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc.errno
        match = re.search(r"os error (\d+)", str(exc))
        if match and int(match.group(1)) in DISK_FULL:
            return int(match.group(1))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def disk_full_guard(path: Path, needed: int, *, cleanup: Path | None = None, retry: str | None = None) -> Iterator[None]:
    """Turn a disk-full error inside the block into DiskFullError naming `path`; on any failure remove `cleanup`
    (the temporary file or folder being written), so a partial write neither stays nor takes space."""
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            _remove(cleanup)
        code = disk_full_errno(exc)
        if code is None or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(Path(path).absolute(), needed, free_bytes(path), code, retry) from exc


def write_folder(final: Path, fill: Callable[[Path], None], needed: int) -> None:
    """Write a folder whole or not at all: `fill(tmp)` writes into a temporary sibling folder, which then replaces
    `final`. Refused before writing when the disk has less than `needed` bytes free."""
    from distil.paths import replace_folder

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while saving; frees its space first
    check_space(final, needed)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with disk_full_guard(final, needed, cleanup=tmp):
        tmp.mkdir()
        fill(tmp)
        replace_folder(tmp, final)
