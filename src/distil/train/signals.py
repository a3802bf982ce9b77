"""Graceful stop: the first SIGTERM or Ctrl-C asks the loop to finish its step, save and exit; a second Ctrl-C
stops at once.

`stop_signals()` nests: a run wraps all its stages in one (so a signal that arrives between stages, while data loads
or a model is saved, is not lost), and each `train()` call inside it shares the same flag.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StopRequested(Exception):
    """Raised by the loop after it saved a checkpoint in answer to a stop signal."""

    def __init__(self, stage: str, step: int, checkpoint: Path | None, run_dir: Path | None = None):
        self.stage, self.step, self.checkpoint, self.run_dir = stage, step, checkpoint, run_dir
        super().__init__(f"stopped at step {step} of stage '{stage}' (checkpoint {checkpoint})")


class _StopFlag:
    requested = False


_active: _StopFlag | None = None


@contextmanager
def stop_signals() -> Iterator[_StopFlag]:
    global _active
    if _active is not None:  # an outer run already listens: share its flag
        yield _active
        return
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals can only be handled on the main thread
        yield flag
        return

    def on_signal(signum: int, frame: object) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
