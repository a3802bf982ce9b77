"""Metrics: one JSON object per line in `metrics.jsonl` (every loss term, lr, throughput, evaluations), mirrored to
TensorBoard when it is installed. With several processes only rank 0 writes; the loop has already summed the
values over ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Fields that depend on wall-clock time: they differ between otherwise identical runs.
TIMING_KEYS = ("time_s", "samples_per_s", "tokens_per_s")


class MetricsLog:
    def __init__(self, path: Path, *, tensorboard: bool = True):
        from distil.train.distributed import is_main

        self.path = Path(path)
        self.enabled = is_main()  # False on ranks > 0: their writes are no-ops
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_torn_tail()
            self._tb = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None and "step" in record:
            arm = record.get("arm", "run")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{arm}/{key}", value, record["step"])

    def _drop_torn_tail(self) -> None:
        """A process killed inside `write` can leave half a line; cut it so the next record starts on its own line."""
        if not self.path.is_file():
            return
        with open(self.path, "r+b") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line torn by a killed process; the resumed stage writes it again
                continue
        return records

    def truncate(self, arm: str, after_step: int) -> None:
        """Drop an arm's records past `after_step`: a resumed run rewrites them exactly as they were."""
        if not self.enabled:
            return
        kept = [r for r in self.read() if not (r.get("arm") == arm and r.get("step", 0) > after_step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
