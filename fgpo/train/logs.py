"""``OUTPUT/metrics.jsonl`` (one JSON row per logged step) and TensorBoard when installed.

On resume, rows written after the checkpoint being resumed belong to the lost future and are
dropped, so the file always describes the one run that the checkpoints continue. A last line
cut short by a kill is dropped too (with a warning); any other damage is an error naming the
line. Each row is written whole and flushed; a full disk says so and where.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from ..data.files import append_jsonl, read_jsonl, rewrite_jsonl, write_error

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only metrics rows of the main process (other processes get a no-op log)."""

    def __init__(self, output_dir: str, *, resumed_step: int, enabled: bool, tensorboard: bool):
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        rows: list[dict[str, Any]] = []
        if resumed_step and os.path.exists(self.path):
            rows, partial = read_jsonl(self.path)
            if partial:
                log.warning("%s: dropped a last line cut short by an interruption", self.path)
            rows = [r for r in rows if r.get("step", 0) <= resumed_step]
        rewrite_jsonl(self.path, rows)
        self._steps = {r.get("step") for r in rows}
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(e, self.path) from e
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = None

    def has_step(self, step: int) -> bool:
        """Whether a row of ``step`` is in the file (other processes: always False)."""
        return self._file is not None and step in self._steps

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        append_jsonl(self._file, [row], self.path)
        self._steps.add(row.get("step"))
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the buffer was flushed after every row; nothing is lost here
                pass
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
