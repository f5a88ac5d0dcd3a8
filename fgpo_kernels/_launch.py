"""Launch order and grid sizes of the GPU kernels (Triton and CUDA): one home, host arithmetic only.

Every forward and backward kernel tiles the logits into (row block, vocabulary tile) pieces. The
forward gives each program a row block and a run of ``tiles_per_split`` vocabulary tiles (a
split); the backward kernels give each program one tile (splits = tiles). Two choices decide how
fast that runs on a GPU, and both are made here, for the kernels' host code and for
``benchmarks/gpu_model.py`` alike:

- **Splits** (forward): how many programs share a row block's vocabulary. The makespan of the
  grid is ``ceil(programs / per_wave) * tiles_per_split`` tile-steps per SM; ``plan`` picks the
  split count whose wave fits L2 (below) with the smallest makespan, so grids come in whole
  waves where the tile count allows, and a wave never spans more row blocks than fit.
- **Launch order** (all kernels): programs are numbered in groups of ``group`` row blocks; inside
  a group the row block is the fastest index, then the split (tile). One wave of resident
  programs therefore covers ``group`` row blocks x ``per_wave / group`` splits (or whole
  groups, when a group is shorter than a wave: ``wave_footprint``). A hidden-state block is
  re-read from L2 for every vocabulary tile; it stays there when the bytes one wave touches
  between two uses (its reuse distance) fit the cache:

      working_set = wave row blocks * h_block + wave splits * w_window

  ``h_block`` = BLOCK_N rows x (D + Dr) x bytes (both models' hidden states), ``w_window`` = the
  weight bytes one split holds while the row blocks of its group read them. Every kernel loads W
  with ``evict_first`` (Triton ``eviction_policy``; CUDA ``cp.async ... L2::cache_hint`` with an
  evict_first policy, hidden states evict_last), so W only has to survive the slices in flight:
  ``stages x BLOCK_V x BLOCK_D`` (Triton, per weight read in the loop), ``kStages x BLOCK_V x
  kBlockK`` (CUDA forward: one weight at a time) and, for the CUDA backward, the larger of that
  ring and its two ``BLOCK_V x kChunkD`` W chunks. ``group_rows`` takes the largest group whose
  working set fits ``l2_fraction`` of L2 (half: H100/H200 split their L2 in two partitions),
  since each group re-reads W once: W traffic = ceil(row_blocks / group) x |W|.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._util import simulated_gpu, sm_count

# The share of L2 one wave's working set may use (Hopper splits its L2 in two partitions: 25 MB
# each of the H100 SXM's 50 MB; the H200s we are lent report 60 MB).
L2_FRACTION = 0.5
# L2 size assumed when the device cannot say (the meta device of a simulation, a CPU): the H100's,
# the smaller of the two (a plan that fits it fits the H200).
DEFAULT_L2_BYTES = 50 * 1024 * 1024
# CUDA kernel tiles (csrc/launch.h kBlockRows / kBlockVocab / kBlockK / kStages / kStagesWgmma /
# kChunkD:
# tests/test_launch.py reads the header; the built extension's BLOCK_* must agree, cuda_kl
# checks).
CUDA_BLOCK_ROWS = 128
CUDA_BLOCK_VOCAB = 128
CUDA_BLOCK_K = 32
CUDA_STAGES = 3
CUDA_STAGES_WGMMA = 4  # the sm_90a wgmma forward's ring (csrc/fwd_wgmma.cuh)
CUDA_CHUNK_D = 64


class GridPlan(NamedTuple):
    row_blocks: int  # cdiv(N, BLOCK_N)
    n_tiles: int  # cdiv(V, BLOCK_V)
    splits: int  # programs per row block (backward kernels: = n_tiles)
    tiles_per_split: int  # vocabulary tiles each program walks (backward kernels: 1)
    group: int  # row blocks numbered together (the launch order above)
    per_wave: int  # programs resident at once (SMs x programs per SM)
    waves: int  # ceil(programs / per_wave)
    working_set: int  # bytes one wave touches between two uses of a hidden-state block
    budget: int  # the share of L2 it should fit

    @property
    def programs(self) -> int:
        return self.row_blocks * self.splits

    @property
    def fits(self) -> bool:
        return self.working_set <= self.budget


def l2_bytes(device: torch.device) -> int:
    """L2 cache bytes of a CUDA device (``DEFAULT_L2_BYTES`` for a simulated GPU or elsewhere)."""
    if simulated_gpu() is None and device.type == "cuda" and torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def wave_footprint(row_blocks: int, splits: int, per_wave: int, group: int) -> tuple[int, int]:
    """(row blocks, splits) one wave of ``per_wave`` consecutive programs covers in the grouped
    order: inside a group ``group`` row blocks x the splits it has reached; a wave longer than a
    group covers whole groups (every split)."""
    p = min(per_wave, row_blocks * splits)
    g = max(1, min(group, row_blocks))
    if p >= g * splits:
        return min(row_blocks, -(-p // (g * splits)) * g), splits
    return min(g, p), min(splits, -(-p // g))


def group_rows(
    row_blocks: int, splits: int, per_wave: int, h_block: int, w_window: int, budget: int
) -> tuple[int, int]:
    """(group, working set): the largest group of row blocks whose wave working set
    (``h_block`` per row block, ``w_window`` per split) fits ``budget`` bytes (fewest re-reads of
    W); when none does, the group with the smallest working set."""

    def ws(g: int) -> int:
        rows, cols = wave_footprint(row_blocks, splits, per_wave, g)
        return rows * h_block + cols * w_window

    sizes = range(1, row_blocks + 1)
    fitting = [g for g in sizes if ws(g) <= budget]
    g = max(fitting) if fitting else min(sizes, key=lambda k: (ws(k), -k))
    return g, ws(g)


def _makespan(row_blocks: int, splits: int, n_tiles: int, per_wave: int) -> int:
    """Tile-steps per SM of the grid: whole waves x tiles per program."""
    return -(-row_blocks * splits // per_wave) * -(-n_tiles // splits)


def plan(
    n: int, v: int, block_n: int, block_v: int, *, h_row_bytes: int, w_window: int,
    per_wave: int, l2: int, splits: int | None = None, tiles_per_program: int | None = None,
) -> GridPlan:  # fmt: skip
    """The grid of one launch. ``h_row_bytes``: hidden-state bytes of one row (all models),
    ``w_window``: see the module doc. The forward's split count fills at least one wave where
    the tiles allow, then has a wave working set within the budget (with the largest group for
    it) and the smallest makespan, then fewest W re-reads, then fewest splits. ``splits`` fixes
    it (tests, the interpreter); ``tiles_per_program=1`` plans a backward grid (one tile per
    program)."""
    row_blocks = max(1, -(-n // block_n))
    n_tiles = max(1, -(-v // block_v))
    budget = int(l2 * L2_FRACTION)
    h_block = block_n * h_row_bytes
    if tiles_per_program == 1:
        candidates = [n_tiles]
    elif splits:
        candidates = [max(1, min(int(splits), n_tiles))]
    else:  # every split count with a distinct number of tiles per split
        candidates = sorted({-(-n_tiles // tps) for tps in range(1, n_tiles + 1)})
    best = None
    for s in candidates:
        tps = -(-n_tiles // s)
        s = -(-n_tiles // tps)  # every split owns at least one tile
        group, ws = group_rows(row_blocks, s, per_wave, h_block, w_window, budget)
        fits = ws <= budget
        # Never idle SMs to fit L2: a grid that can fill a wave does.
        fills = row_blocks * s >= min(per_wave, row_blocks * n_tiles)
        key = (not fills, not fits, _makespan(row_blocks, s, n_tiles, per_wave) if fits else ws,
               -(-row_blocks // group), s)  # fmt: skip
        if best is None or key < best[0]:
            best = (key, s, tps, group, ws)
    _, s, tps, group, ws = best
    waves = -(-row_blocks * s // per_wave)
    return GridPlan(row_blocks, n_tiles, s, tps, group, per_wave, waves, ws, budget)


def device_plan(
    n: int, v: int, block_n: int, block_v: int, device: torch.device, *, per_sm: int,
    h_row_bytes: int, w_window: int, splits: int | None = None,
    tiles_per_program: int | None = None,
) -> GridPlan:  # fmt: skip
    """``plan`` for the GPU of ``device`` (its SM count and L2; a simulated GPU's SM count)."""
    return plan(
        n, v, block_n, block_v, h_row_bytes=h_row_bytes, w_window=w_window,
        per_wave=sm_count(device) * per_sm, l2=l2_bytes(device), splits=splits,
        tiles_per_program=tiles_per_program,
    )  # fmt: skip


def cuda_plan_inputs(
    d: int, dr: int, kl: bool, elem: int = 2, *, backward: bool = False, wgmma: bool = False
) -> tuple[int, int]:
    """(hidden-state bytes of one row, W bytes one split holds in L2) of a CUDA launch. The
    weights are loaded evict_first, one at a time (a shared weight serves both dots; separate
    weights run one main loop each), so a split holds the cp.async ring's slices in flight;
    the backward also streams W in two ``CUDA_CHUNK_D``-wide chunks (csrc/kernels.cuh); the
    sm_90a wgmma forward (``wgmma``) has a ring of ``CUDA_STAGES_WGMMA`` slices."""
    h_row = (d + (dr if kl else 0)) * elem
    stages = CUDA_STAGES_WGMMA if wgmma and not backward else CUDA_STAGES
    w_window = stages * CUDA_BLOCK_VOCAB * CUDA_BLOCK_K * elem
    if backward:
        w_window = max(w_window, 2 * CUDA_BLOCK_VOCAB * CUDA_CHUNK_D * elem)
    return h_row, w_window
