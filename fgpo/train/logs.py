"""``OUTPUT/metrics.jsonl`` (one JSON row per logged step) and TensorBoard when installed.

On resume, rows written after the checkpoint being resumed belong to the lost future and are
dropped, so the file always describes the one run that the checkpoints continue.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsLog:
    """Append-only metrics rows of the main process (other processes get a no-op log)."""

    def __init__(self, output_dir: str, *, resumed_step: int, enabled: bool, tensorboard: bool):
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        rows = []
        if resumed_step and os.path.exists(path):
            with open(path) as f:
                rows = [r for r in f if r.strip() and json.loads(r)["step"] <= resumed_step]
        with open(path, "w") as f:
            f.writelines(rows)
        self._file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
