"""The parts of an optimizer step besides the model: the learning-rate schedule, and the
step's metrics averaged over its micro-batches and processes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import fgpo_kernels as fk


def lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """The factor of the base lr at each step: linear warmup, then ``cosine`` / ``linear``
    decay to 0 at ``total``, or ``constant``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class StepMetrics:
    """Sums and counts of one step's per-example metrics over its micro-batches.

    The visual metrics count only examples with v' (elsewhere they are NaN by design); every
    other value counts, so a NaN example shows as a NaN mean instead of vanishing.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.tokens = 0

    def _add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def add(self, b: dict[str, Any], out: Any) -> None:
        """One micro-batch ``b`` and its loss output (summed loss, ``(B,)`` metrics)."""
        self._add("loss", float(out.loss.detach()), b["batch_size"])
        has_v = b["has_corrupt"] != 0
        for name, v in out.metrics.items():
            keep = has_v.to(v.device) if name in fk.VISUAL_METRIC_KEYS else torch.ones_like(has_v)
            self._add(name, float(v[keep.to(v.device)].sum()), float(keep.sum()))
        self.tokens += int(b["attention_mask"][: 2 * b["batch_size"]].sum())  # (v, y±) only

    def all_reduce(self, world: int) -> None:
        """Sum over the processes (collective; a no-op for one)."""
        if world == 1:
            return
        # Visual metrics exist only where a micro-batch had v': agree on the key set first.
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, sorted(self.sums))
        names = sorted(set().union(*gathered))
        vec = torch.tensor(
            [self.sums.get(n, 0.0) for n in names]
            + [self.counts.get(n, 0.0) for n in names]
            + [self.tokens],
            dtype=torch.float64,
        )
        dist.all_reduce(vec)
        m = len(names)
        self.sums = dict(zip(names, vec[:m].tolist()))
        self.counts = dict(zip(names, vec[m : 2 * m].tolist()))
        self.tokens = int(vec[-1])

    def means(self) -> dict[str, float]:
        """``loss`` first, then every metric's mean (NaN where no example counted)."""
        out = {"loss": self.sums["loss"] / max(self.counts["loss"], 1.0)}
        for n in sorted(self.sums):
            if n != "loss":
                out[n] = self.sums[n] / self.counts[n] if self.counts[n] else float("nan")
        return out
