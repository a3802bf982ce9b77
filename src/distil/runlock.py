"""One run per run directory: a lock that a second `distil run` or `distil resume` on the same folder is refused by.

The lock is `fcntl.flock` on `RUN_DIR/.lock`, held from the start of the run until it ends. The kernel releases it
when the process dies, however it dies (SIGKILL, a crash, the machine's OOM killer), so a killed run can be resumed
at once: there is no stale lock file to delete. The file holds the pid of the holder, for the refusal message. Under
torchrun only rank 0 takes it (it is the rank that writes every file).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from distil.errors import DistilError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run directory -> open file descriptor holding its lock, in this process


def acquire(run_dir: Path) -> None:
    """Lock `run_dir` for this process, or raise DistilError naming the process that holds it."""
    key = Path(run_dir).resolve()
    if key in _held:
        raise DistilError(f"{run_dir} is in use by another run in this process; wait for it to finish, "
                          "or choose another output_dir=PATH")
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DistilError(f"{run_dir} is in use by another distil run (pid {holder}); wait for it to finish or stop "
                          "it, or choose another output_dir=PATH (two runs would overwrite each other)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release(run_dir: Path) -> None:
    """Give the lock back (a no-op when this process does not hold it, e.g. on ranks > 0)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock
