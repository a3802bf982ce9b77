"""Graceful stop: the first SIGTERM or Ctrl-C asks the loop to finish its step, save and exit; a second Ctrl-C
stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StopRequested(Exception):
    """Raised by the loop after it saved a checkpoint in answer to a stop signal."""

    def __init__(self, stage: str, step: int, checkpoint: Path | None):
        self.stage, self.step, self.checkpoint = stage, step, checkpoint
        super().__init__(f"stopped at step {step} of stage '{stage}' (checkpoint {checkpoint})")


class _StopFlag:
    requested = False


@contextmanager
def stop_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals can only be handled on the main thread
        yield flag
        return

    def on_signal(signum: int, frame: object) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
