"""Tiles chosen by measurement at first use, when asked: env FGPO_TRITON_TUNE=1 (off by default).

Why: the shipped sm_90 tiles of the main forward ("fwd") and of the G kernel writing G or Gr
("g") run one 128 x 128 program per SM, whose exp/log epilogue overlaps the next tile's copies
(the flattened loop) but not its matmuls. ``configs.TUNE_CANDIDATES`` holds 64 x 128 tiles at
two programs per SM (one program's epilogue under the other's matmuls, twice the W traffic from
L2 per FLOP). ``benchmarks.gpu_model`` PREDICTS a wash, so only the GPU can choose.

What: the first launch of such an entry for a key (device, dtype, weights, gradients, rows rounded
up to a power of two, D, V) runs the shipped tiles and every candidate: one warm-up call (it
compiles; its outputs are the ones compared), then ``REPEATS`` calls timed with CUDA events, and
keeps the fastest median unless the shipped tiles are within ``MARGIN`` of it. A candidate whose
result differs from the shipped tiles' (relative norm of the difference above ``AGREE``, on every
output, sampled to at most 256 rows) or that fails to compile or launch is dropped, its reason kept
in ``choices()``; the shipped tiles failing raise. Later calls with that key reuse the choice (this
process only). Off: the shipped table, nothing timed, the same tiles in every run. Off a real CUDA
device (CPU, interpreter, a memory simulation) the shipped tiles run; while a CUDA graph is being
captured, a choice made before the capture is used and none is made (nothing is timed). Each
process (each rank of a distributed run) tunes for itself; choices may differ between runs, by the
rounding of a different summation order.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import torch
from torch import Tensor

from .._util import simulated_gpu, triton_interpret
from .configs import TUNE_CANDIDATES, KernelConfig

ENV = "FGPO_TRITON_TUNE"
REPEATS = 3
MARGIN = 0.02  # a candidate must beat the shipped tiles by 2 % (timing noise keeps them)
AGREE = 1e-2  # relative norm of the difference from the shipped tiles' result
_SAMPLE_ROWS = 256

# key -> {"entry", "key", "chosen" (KernelConfig), "ms" ({tiles: median ms}), "dropped"}
_CHOSEN: dict[tuple, dict] = {}


def requested() -> bool:
    """Whether env FGPO_TRITON_TUNE asks for tuning ("1"; unset, "" or "0": no)."""
    raw = os.environ.get(ENV, "0")
    if raw not in ("", "0", "1"):
        raise ValueError(f"impl 'triton': {ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


def enabled(device: torch.device) -> bool:
    """Tuning asked for, on a real CUDA device (not the interpreter, not a memory simulation)."""
    if not requested() or device.type != "cuda" or triton_interpret():
        return False
    return simulated_gpu() is None and torch.cuda.is_available()


def _capturing() -> bool:
    """A CUDA graph is being captured: nothing may be timed (nor synchronized) now."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def rows_bucket(n: int) -> int:
    """Rows of a key: ``n`` rounded up to a power of two (at least 64)."""
    return max(64, 1 << max(0, int(n) - 1).bit_length())


def label(cfg: KernelConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_v}x{cfg.block_d}/{cfg.num_warps}w/{cfg.per_sm}perSM"


def choices() -> list[dict]:
    """What this process tuned: one dict per key (entry, key, chosen tiles, median ms of each
    tiles, dropped candidates with their reasons)."""
    return [
        {**c, "chosen": label(c["chosen"]), "key": list(map(str, c["key"]))}
        for c in _CHOSEN.values()
    ]


def clear() -> None:
    """Forget every choice (the next launch of each key tunes again)."""
    _CHOSEN.clear()


def config_for(
    name: str, shipped: KernelConfig, device: torch.device, key: tuple,
    run: Callable[[KernelConfig], object],
    time_fn: Callable[[Callable[[], object]], float] | None = None,
) -> KernelConfig:  # fmt: skip
    """The tiles of a launch of GPU_CONFIGS entry ``name``: ``shipped`` (the launcher's
    ``configs.named_config``) unless tuning is enabled on ``device`` and ``name`` has
    candidates; then the choice for ``key`` (made now at its first launch by timing ``run(cfg)``
    for each tiles, ``time_fn(call) -> ms`` or CUDA events)."""
    if name not in TUNE_CANDIDATES or not enabled(device):
        return shipped
    full_key = (name, *key)
    if full_key not in _CHOSEN:
        if _capturing():  # a choice made before the capture is used; none is made in it
            return shipped
        _CHOSEN[full_key] = _tune(name, full_key, shipped, run, time_fn or _cuda_ms)
    return _CHOSEN[full_key]["chosen"]


def _tune(name, key, shipped, run, time_fn) -> dict:
    ms, dropped = {}, {}
    ref = _sample(run(shipped))  # the shipped tiles failing raise: nothing to fall back to
    ms[label(shipped)] = time_fn(lambda: run(shipped))
    best, best_ms = shipped, ms[label(shipped)] * (1.0 - MARGIN)
    for cfg in TUNE_CANDIDATES[name]:
        try:
            err = _difference(_sample(run(cfg)), ref)
            if err > AGREE:
                dropped[label(cfg)] = f"result differs from the shipped tiles' by {err:.2e}"
                continue
            ms[label(cfg)] = time_fn(lambda c=cfg: run(c))
        except Exception as exc:  # a compile or launch failure: keep the shipped tiles
            dropped[label(cfg)] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if ms[label(cfg)] < best_ms:
            best, best_ms = cfg, ms[label(cfg)]
    return {"entry": name, "key": key, "chosen": best, "ms": ms, "dropped": dropped}


def _cuda_ms(call: Callable[[], object]) -> float:
    """Median ms of ``REPEATS`` calls (CUDA events); ``_tune`` has run each tiles once already
    (its result is compared), which is the warm-up (the compile)."""
    times = []
    for _ in range(REPEATS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _sample(result) -> list[Tensor | None]:
    """At most ``_SAMPLE_ROWS`` evenly spaced rows of each output, in fp32 (a dW at the SPEC
    shape is 2.2 GB: the tuner keeps a sample, not a copy)."""
    out = []
    for x in result:
        if x is None:
            out.append(None)
            continue
        step = max(1, -(-x.shape[0] // _SAMPLE_ROWS)) if x.dim() else 1
        out.append((x[::step] if x.dim() else x).float().clone())
    return out


def _difference(got: list, want: list) -> float:
    """Largest relative norm of the difference over the outputs (inf where one is missing)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            if (g is None) != (w is None):
                return float("inf")
            continue
        scale = float(torch.linalg.vector_norm(w))
        diff = float(torch.linalg.vector_norm(g - w))
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
