"""Kernel configurations and launch-shape choices of the Triton impl (no autotuning).

One explicit table of GPU tile sizes (``GPU_CONFIGS``), the interpreter's tiles, the number of
vocabulary splits of the forward, the backward mode and the gblock chunk width. Everything here
is host-side arithmetic; the kernels read the chosen sizes as constexprs.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .._util import sm_count, triton_interpret


class KernelConfig(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# The shipped GPU configurations, one line each (no autotuning). The tests compile every entry
# ahead of time for sm_80 and sm_90 (for each kernel variant it serves) and check that nothing
# spills and that 16-bit inputs use tensor cores (mma / wgmma); all entries were checked spill-free
# with triton 3.6.0 and 3.7.1. fp32 inputs use IEEE dots (FMA, exact to fp32), which need smaller
# tiles and fewer stages (with 2 stages ptxas spills the log-prob forward and the fp32 backward).
GPU_CONFIGS = {
    "fwd_few_rows": KernelConfig(64, 128, 64, 8, 3),  # bf16/fp16, N <= _FEW_ROWS
    "fwd": KernelConfig(128, 64, 64, 8, 3),  # bf16/fp16, many rows
    # bf16/fp16 forward that also writes its logits (gradients in the forward, fused.py): the
    # stores of two 64 x 128 fp32 tiles spill the "fwd" entries (255 registers + stack).
    "fwd_store": KernelConfig(64, 64, 64, 8, 3),
    "bwd": KernelConfig(64, 128, 32, 8, 3),  # bf16/fp16
    "fwd_fp32": KernelConfig(64, 64, 32, 8, 2),
    "fwd_fp32_logprob": KernelConfig(64, 64, 32, 8, 1),
    "bwd_fp32": KernelConfig(64, 64, 16, 8, 1),
    "g": KernelConfig(64, 128, 64, 8, 3),  # bf16/fp16 gblock G tiles
    "g_fp32": KernelConfig(64, 64, 32, 8, 2),
}
# Rows at or below which the 16-bit forward uses the smaller row block (less padding).
_FEW_ROWS = 1024
# Row blocks that sweep the vocabulary tiles together in the backward kernels (L2 reuse).
BWD_GROUP_N = 8
# Backward modes (env FGPO_TRITON_BWD): "gblock" writes the logit gradient of one vocabulary chunk
# and runs library GEMMs; "atomic" accumulates every tile with fp32 atomics. Why gblock is the
# default: docs/kernels/triton.md.
BWD_MODES = ("gblock", "atomic")
# gblock: elements of the (rows x chunk) gradient buffer(s) at most (env FGPO_TRITON_GBLOCK_ELEMS),
# and a chunk never wider than this many columns (the buffer never spans a whole LM vocabulary).
GBLOCK_ELEMS = 1 << 25
GBLOCK_MAX_COLS = 16384


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _interp_config(n: int, d: int) -> KernelConfig:
    """Large blocks under the interpreter: it pays per operation, not per element."""
    return KernelConfig(
        block_n=min(64, max(16, _next_pow2(n))),
        block_v=512,
        block_d=min(128, max(16, _next_pow2(d))),
        num_warps=4,
        num_stages=1,
    )


KINDS = ("fwd", "fwd_store", "bwd", "g")


def gpu_config_name(kind: str, n: int, dtype: torch.dtype, has_ref: bool) -> str:
    """The GPU_CONFIGS entry used for a launch (``kind``: one of ``KINDS``; "fwd_store" is the
    forward that keeps its logits)."""
    if kind not in KINDS:
        raise ValueError(f"gpu_config_name: kind must be one of {KINDS}, got {kind!r}")
    if dtype == torch.float32:
        kind = "fwd" if kind == "fwd_store" else kind
        if kind == "fwd" and not has_ref:
            return "fwd_fp32_logprob"
        return f"{kind}_fp32"
    if kind == "fwd_store":
        return kind
    if kind == "fwd":
        return "fwd_few_rows" if n <= _FEW_ROWS else "fwd"
    return kind


def kernel_config(kind: str, n: int, d: int, dtype: torch.dtype, has_ref: bool) -> KernelConfig:
    """Tiles of one launch: the interpreter's under TRITON_INTERPRET=1, else the shipped entry."""
    if triton_interpret():
        return _interp_config(n, d)
    return GPU_CONFIGS[gpu_config_name(kind, n, dtype, has_ref)]


def launch_opts(cfg: KernelConfig) -> dict:
    return {} if triton_interpret() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def vocab_splits(n_row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Vocabulary splits: enough programs for ~4 per SM (few on CPU / the interpreter)."""
    if triton_interpret() or device.type != "cuda":
        target = 2
    else:
        target = -(-4 * sm_count(device) // n_row_blocks)
    return max(1, min(n_tiles, target))


def bwd_mode(mode: str | None = None) -> str:
    """The backward mode: ``mode`` if given, else env FGPO_TRITON_BWD, else "gblock"."""
    chosen = mode if mode is not None else (os.environ.get("FGPO_TRITON_BWD") or "gblock")
    if chosen not in BWD_MODES:
        src = "mode" if mode is not None else "FGPO_TRITON_BWD"
        raise ValueError(f"impl 'triton': {src} must be one of {BWD_MODES}, got {chosen!r}")
    return chosen


def gblock_elems(chunk_elems: int | None) -> int:
    """The gblock buffer budget: ``chunk_elems`` if given, else env FGPO_TRITON_GBLOCK_ELEMS,
    else GBLOCK_ELEMS."""
    if chunk_elems is not None:
        value, src = chunk_elems, "chunk_elems"
    else:
        raw, src = os.environ.get("FGPO_TRITON_GBLOCK_ELEMS"), "FGPO_TRITON_GBLOCK_ELEMS"
        if not raw:
            return GBLOCK_ELEMS
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"impl 'triton': {src} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"impl 'triton': {src} must be positive, got {value}")
    return int(value)


def chunk_columns(rows: int, v: int, block_v: int, budget: int) -> int:
    """gblock vocabulary chunk width: a multiple of ``block_v`` with rows x width <= budget
    (at least one tile), at most GBLOCK_MAX_COLS, no wider than V rounded up to a tile."""
    vc = budget // max(1, rows) // block_v * block_v
    cap = max(block_v, GBLOCK_MAX_COLS // block_v * block_v)
    return max(block_v, min(vc, cap, -(-v // block_v) * block_v))
