"""Kernel configurations and launch-shape choices of the Triton impl (no autotuning unless
asked: ``tune.py``, env FGPO_TRITON_TUNE=1).

One explicit table of GPU tile sizes (``GPU_CONFIGS``), the interpreter's tiles, the number of
vocabulary splits of the forward, the backward mode and the gblock chunk width. Everything here
is host-side arithmetic; the kernels read the chosen sizes as constexprs.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .. import _launch
from .._launch import GridPlan
from .._util import simulated_gpu, triton_interpret


class KernelConfig(NamedTuple):
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    # Programs resident per SM on sm_90 (registers and shared memory of the compiled kernel allow
    # it; tests/test_triton_aot.py checks): sizes the waves of the launch plan (_launch.py).
    per_sm: int = 1
    # Forward and G kernel: one software-pipelined loop over (vocabulary tile, D slice) instead
    # of a tile loop around a D loop (the G kernel: instead of one tile per program), through
    # ``tl.range(flatten=True)``, so the copies of a tile's first slices are in flight during
    # the previous tile's epilogue (and G stores) instead of starting after it (the tests check
    # the compiled loop nest on sm_80 / sm_90). Needs num_stages > 1.
    flatten: bool = False


# The shipped GPU configurations, one line each (tune.py: opt-in). The tests compile every entry
# ahead of time for the architectures it serves (``SM80_ONLY`` / ``SM90_ONLY``, else sm_80 and
# sm_90), for each kernel variant, with D, Dr and the strides multiples of 16 as the launcher
# specializes them at the SPEC shape (the kernels tell triton not to specialize their other int
# arguments, so this is the kernel a GPU runs), and check that nothing spills, that 16-bit
# inputs use tensor cores, the widest wgmma instruction on sm_90, the shared memory per program
# and ``per_sm``, with the installed triton and with 3.6.0 (the GPU machine's). On sm_90,
# 128 x 128 tiles give wgmma m64n128k16 (64-wide tiles give m64n64,
# which needs about the whole shared-memory bandwidth of an SM); so do 64 x 128 tiles with 4
# warps (one warpgroup). On sm_90 the kept-logit and G tiles are stored through TMA descriptors
# (``common._store_tile``): no per-element addresses in registers. Where a kernel holds two
# 128-wide fp32 tiles AND their gradients, ptxas spills unless the G kernel's chunk width is
# specialized as a multiple of 16 ("g_both": its launches are split by ``g_launches``); the
# kept-logit reads still spill at 128 wide (bytes of stack measured with triton 3.7.1 in the
# comments) and keep narrower tiles; so does sm_80 (mma.sync, no wgmma: 104 B of spill at
# 128 x 128). fp32 inputs use IEEE dots (FMA, exact to fp32), which need smaller tiles and
# fewer stages.
GPU_CONFIGS = {
    "fwd": KernelConfig(128, 128, 64, 8, 3, flatten=True),  # sm_90 bf16/fp16 fwd: m64n128k16
    "fwd_sm80": KernelConfig(128, 64, 32, 8, 3, flatten=True),  # sm_80 bf16/fp16 forward
    # bf16/fp16 forward that also writes its logits (gradients in the forward, fused.py). sm_90:
    # TMA stores (no per-element addresses; pointer stores spilled 696 B at 128 x 128 and 168 B
    # at 64 x 128 x 4 warps) into one warpgroup's m64n128k16 tiles, 255 registers, no spill,
    # 82 KB (shared) / 106 KB (separate) of shared memory: 2 programs per SM. Not flattened:
    # that spilled 40 B (triton 3.7.1) / 48 B (3.6.0); the second program hides the epilogue.
    "fwd_store": KernelConfig(64, 128, 32, 4, 3, per_sm=2),
    # sm_80 (no TMA: pointer stores; 64 x 128 spills 1.4 KB there, 64 x 64 x 64 8 B).
    "fwd_store_sm80": KernelConfig(64, 64, 32, 8, 3, flatten=True),
    "bwd": KernelConfig(64, 128, 32, 8, 3),  # bf16/fp16 atomic backward
    "fwd_fp32": KernelConfig(64, 64, 16, 8, 1),
    "fwd_fp32_logprob": KernelConfig(32, 64, 32, 4, 1, per_sm=4),
    "bwd_fp32": KernelConfig(64, 32, 16, 8, 1),
    # sm_90 gblock writing G or Gr (LoRA): m64n128k16, several tiles per program in one
    # flattened loop (0 B of spill; a plain tile loop around the D loop spilled 80 B)
    "g": KernelConfig(128, 128, 64, 8, 3, flatten=True),
    # sm_90 gblock writing G AND Gr from recomputed logits (trained shared head, or a reference
    # that needs gradients): m64n128k16, 255 registers, 0 B of spill, but only for chunk widths
    # that are multiples of G_ALIGN (triton specializes such a `chunk_v`; any other width spills
    # 8 B here and 64 B at 128 x 128 x 64 / 8 warps, triton 3.7.1, TMA stores) and with N not
    # specialized (N % 16 == 0 spilled 16 B): `_g_kernel_aligned` specializes chunk_v and v0
    # only, `_g_kernel` (every other launch) v0 only. ``g_launches``
    # hands it such widths only and sends a ragged tail (< 16 columns) to "g_narrow". A split of
    # tiles per program in one flattened loop, as "g" (0 B of spill on triton 3.7.1 and 3.6.0;
    # so does 128 x 128 x 64 / 8 warps flattened, at 1 per SM, whose unhidden epilogue, the
    # heaviest of all, makes the whole backward 1.5 % slower in the model; not yet timed).
    "g_both": KernelConfig(64, 128, 32, 4, 3, per_sm=2, flatten=True),
    # Every other gblock launch: G from kept logits with a reference (FROM_LOGITS; TMA loads
    # spill 320 B at 128 x 128, pointer loads 4 KB at 64 x 128; no dot there, so the width buys
    # no tensor-core rate), the tails of "g_both" chunks, and everything on sm_80 (m64n64 on
    # sm_90, mma.sync on sm_80).
    "g_narrow": KernelConfig(128, 64, 64, 8, 3),
    "g_fp32": KernelConfig(64, 64, 16, 8, 2, per_sm=2),
}
# Tiles a run with FGPO_TRITON_TUNE=1 may take instead of the shipped "fwd" / "g" (``tune.py``
# times them at first use): 64 x 128 with one warpgroup (m64n128k16), two programs per SM, so
# one program's exp/log epilogue runs under the other's matmuls (the shipped 128 x 128 tiles,
# one per SM, overlap it with the next tile's copies only) at the price of twice the W traffic
# from L2 per FLOP. The model PREDICTS a wash; only a GPU can choose. tests/test_triton_aot.py
# compiles them like the shipped entries (through benchmarks/gpu_tiles.py, which times them).
TUNE_CANDIDATES = {
    "fwd": (KernelConfig(64, 128, 32, 4, 3, per_sm=2, flatten=True),),
    # one tile per program: flattened, these tiles spill 64 B (shared) / 72 B (separate) of
    # registers (triton 3.7.1, sm_90)
    "g": (KernelConfig(64, 128, 32, 4, 3, per_sm=2),),
}
SM90_ONLY = ("fwd", "fwd_store", "g", "g_both")
SM80_ONLY = ("fwd_sm80", "fwd_store_sm80")
# Backward modes (env FGPO_TRITON_BWD): "gblock" writes the logit gradient of one vocabulary chunk
# and runs library GEMMs; "atomic" accumulates every tile with fp32 atomics. Why gblock is the
# default: docs/kernels/triton.md.
BWD_MODES = ("gblock", "atomic")
# gblock: elements of the (rows x chunk) gradient buffer(s). On a GPU the budget is a share of
# the device's free memory (``gblock_budget``), between the floor and the cap below; elsewhere
# (CPU, interpreter, simulation) GBLOCK_ELEMS. Env FGPO_TRITON_GBLOCK_ELEMS overrides both.
GBLOCK_ELEMS = 1 << 25
GBLOCK_FREE_FRACTION = 0.125  # of the free bytes at the call: G buffers live only inside it
GBLOCK_MAX_ELEMS = 1 << 28  # 512 MB of bf16: chunk GEMMs are already at full rate far below
GBLOCK_MIN_ELEMS = 1 << 22  # below this, per-chunk launches start to cost time
# A chunk is never wider than this many columns (the buffer never spans a whole LM vocabulary).
GBLOCK_MAX_COLS = 16384


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _interp_config(n: int, d: int, flatten: bool = False) -> KernelConfig:
    """Large blocks under the interpreter: it pays per operation, not per element; the GPU
    entry's loop structure (``flatten``: a G kernel's tile loop runs only then)."""
    return KernelConfig(
        block_n=min(64, max(16, _next_pow2(n))),
        block_v=512,
        block_d=min(128, max(16, _next_pow2(d))),
        num_warps=4,
        num_stages=1,
        flatten=flatten,
    )


KINDS = ("fwd", "fwd_store", "bwd", "g")
# Entries compiled spill-free only for launches whose `chunk_v` is a multiple of G_ALIGN (the
# value triton's launcher then specializes as divisible by 16): ``g_launches`` splits for them.
G_ALIGNED = ("g_both",)
G_ALIGN = 16
G_TAIL = "g_narrow"  # the entry that takes the ragged tail of an aligned entry's chunk


def gpu_config_name(
    kind: str, n: int, dtype: torch.dtype, has_ref: bool, *, shared: bool = True,
    both: bool = False, held: bool = False, arch: int = 90,
) -> str:  # fmt: skip
    """The GPU_CONFIGS entry used for a launch (``kind``: one of ``KINDS``; "fwd_store" is the
    forward that keeps its logits). ``shared``: the reference uses the policy's weight;
    ``both``: a "g" launch writes G and Gr; ``held``: a "g" launch reads kept logits
    (FROM_LOGITS); ``arch``: the GPU's compute capability as major * 10 + minor (below 90: no
    wgmma). An entry in ``G_ALIGNED`` is launched through ``g_launches``."""
    if kind not in KINDS:
        raise ValueError(f"gpu_config_name: kind must be one of {KINDS}, got {kind!r}")
    if dtype == torch.float32:
        kind = "fwd" if kind == "fwd_store" else kind
        if kind == "fwd" and not has_ref:
            return "fwd_fp32_logprob"
        return f"{kind}_fp32"
    if kind in ("fwd", "fwd_store"):
        return kind if arch >= 90 else f"{kind}_sm80"
    if kind == "g":
        if arch < 90 or (has_ref and held):
            return "g_narrow"
        return "g_both" if has_ref and both else "g"
    return kind


def g_launches(name: str, width: int) -> list[tuple[int, int, str]]:
    """The G-kernel launches over one gblock chunk of ``width`` columns whose entry is
    ``name``: [(first column within the chunk, columns, GPU_CONFIGS entry)]. An entry in
    ``G_ALIGNED`` gets the widest multiple of G_ALIGN columns, the rest (< G_ALIGN columns: only
    in a ragged last chunk) goes to ``G_TAIL``; any other entry gets the whole chunk."""
    if width < 0:
        raise ValueError(f"g_launches: width must be >= 0, got {width}")
    if name not in G_ALIGNED:
        return [(0, width, name)] if width else []
    main = width // G_ALIGN * G_ALIGN
    out = [(0, main, name)] if main else []
    return out + ([(main, width - main, G_TAIL)] if width > main else [])


def device_arch(device: torch.device | None) -> int:
    """Compute capability (major * 10 + minor) of a CUDA device; 90 (H100/H200) for a simulated
    GPU or when none can be asked."""
    if device is None or device.type != "cuda" or simulated_gpu() is not None:
        return 90
    if not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def kernel_config(
    kind: str, n: int, d: int, dtype: torch.dtype, has_ref: bool, *, shared: bool = True,
    both: bool = False, held: bool = False, device: torch.device | None = None,
) -> KernelConfig:  # fmt: skip
    """Tiles of one launch: the interpreter's under TRITON_INTERPRET=1, else the shipped entry
    for ``device``'s architecture."""
    name = gpu_config_name(kind, n, dtype, has_ref, shared=shared, both=both, held=held,
                           arch=device_arch(device))  # fmt: skip
    return named_config(name, n, d)


def named_config(name: str, n: int, d: int) -> KernelConfig:
    """The tiles a launch of entry ``name`` runs with: the interpreter's own under
    TRITON_INTERPRET=1 (it pays per operation, not per element), else ``GPU_CONFIGS[name]``."""
    if triton_interpret():
        return _interp_config(n, d, GPU_CONFIGS[name].flatten)
    return GPU_CONFIGS[name]


def g_tiles_per_program(cfg: KernelConfig) -> int | None:
    """Vocabulary tiles per G-kernel program: 1, or with ``cfg.flatten`` the launch plan's
    choice (splits that fill whole waves, as the forward's; ``_launch.plan``)."""
    return None if cfg.flatten else 1


def tma_tiles(device: torch.device | None) -> bool:
    """Whether kept-logit and G tiles move through TMA tensor descriptors: on sm_90 and in the
    interpreter (which runs the same kernel code on CPU tensors); sm_80 has no TMA. Env
    FGPO_TRITON_TMA=0 turns it off (per-element pointer stores, the sm_80 path)."""
    if os.environ.get("FGPO_TRITON_TMA", "1") == "0":
        return False
    return triton_interpret() or device_arch(device) >= 90


def launch_opts(cfg: KernelConfig) -> dict:
    return {} if triton_interpret() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def plan_inputs(
    cfg: KernelConfig, d: int, dr: int, has_ref: bool, shared: bool, elem: int
) -> tuple[int, int]:
    """(hidden-state bytes of one row, W bytes one split holds in L2) of a Triton launch, for
    ``_launch.plan``. W loads are ``evict_first``: a split holds only the slices in flight,
    ``num_stages x BLOCK_V x BLOCK_D`` (per weight)."""
    h_row = (d + (dr if has_ref else 0)) * elem
    w_window = cfg.num_stages * cfg.block_v * cfg.block_d * elem * (1 if shared else 2)
    return h_row, w_window


def grid_plan(
    cfg: KernelConfig, n: int, v: int, d: int, dr: int, has_ref: bool, shared: bool,
    dtype: torch.dtype, device: torch.device, *, splits: int | None = None,
    tiles_per_program: int | None = None,
) -> GridPlan:  # fmt: skip
    """Splits, launch-order group and waves of one Triton launch on ``device``
    (``_launch.device_plan``). On a CPU or the interpreter (one "SM") the forward takes 2
    splits unless told, so the tests run the merge."""
    elem = dtype.itemsize
    h_row, w_window = plan_inputs(cfg, d, dr, has_ref, shared, elem)
    if (
        splits is None
        and tiles_per_program is None
        and (triton_interpret() or (device.type != "cuda" and simulated_gpu() is None))
    ):
        splits = 2
    return _launch.device_plan(
        n, v, cfg.block_n, cfg.block_v, device, per_sm=cfg.per_sm, h_row_bytes=h_row,
        w_window=w_window, splits=splits, tiles_per_program=tiles_per_program,
    )  # fmt: skip


def bwd_mode(mode: str | None = None) -> str:
    """The backward mode: ``mode`` if given, else env FGPO_TRITON_BWD, else "gblock"."""
    chosen = mode if mode is not None else (os.environ.get("FGPO_TRITON_BWD") or "gblock")
    if chosen not in BWD_MODES:
        src = "mode" if mode is not None else "FGPO_TRITON_BWD"
        raise ValueError(f"impl 'triton': {src} must be one of {BWD_MODES}, got {chosen!r}")
    return chosen


def gblock_budget(free_bytes: int, elem_bytes: int) -> int:
    """gblock buffer elements for a device with ``free_bytes`` free: GBLOCK_FREE_FRACTION of
    them in the input dtype, clamped to [GBLOCK_MIN_ELEMS, GBLOCK_MAX_ELEMS]."""
    elems = int(free_bytes * GBLOCK_FREE_FRACTION) // max(1, int(elem_bytes))
    return max(GBLOCK_MIN_ELEMS, min(GBLOCK_MAX_ELEMS, elems))


def gblock_elems(
    chunk_elems: int | None, device: torch.device | None = None, elem_bytes: int = 2
) -> int:
    """The gblock buffer budget: ``chunk_elems`` if given, else env FGPO_TRITON_GBLOCK_ELEMS,
    else, on a GPU, ``gblock_budget`` of its free memory now (a simulated GPU: the largest,
    GBLOCK_MAX_ELEMS), else GBLOCK_ELEMS."""
    if chunk_elems is not None:
        value, src = chunk_elems, "chunk_elems"
    else:
        raw, src = os.environ.get("FGPO_TRITON_GBLOCK_ELEMS"), "FGPO_TRITON_GBLOCK_ELEMS"
        if not raw:
            if simulated_gpu() is not None:  # a memory simulation: the largest the GPU takes
                return GBLOCK_MAX_ELEMS
            if device is not None and device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(device)
                return gblock_budget(free, elem_bytes)
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
