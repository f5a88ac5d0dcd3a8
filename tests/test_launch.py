"""The launch plan of the GPU kernels (``fgpo_kernels/_launch.py``): the grouped launch order,
the wave working set it is sized by, split counts in whole waves, and the CUDA tile constants
shared with csrc/launch.h. Pure host arithmetic: no GPU, no Triton."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fgpo_kernels import _launch

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _order(row_blocks: int, cols: int, group: int) -> list[tuple[int, int]]:
    """(row block, column) of every program id in grouped order: the mapping the kernels
    implement (triton_kl/common.py ``_grouped_pid``, csrc/launch.h ``grouped_pos``)."""
    out = []
    for pid in range(row_blocks * cols):
        per_group = group * cols
        first = (pid // per_group) * group
        size = min(row_blocks - first, group)
        local = pid % per_group
        out.append((first + local % size, local // size))
    return out


def test_cuda_tile_constants_match_the_header():
    text = (CSRC / "launch.h").read_text()
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", text)}
    assert consts["kBlockRows"] == _launch.CUDA_BLOCK_ROWS
    assert consts["kBlockVocab"] == _launch.CUDA_BLOCK_VOCAB
    assert consts["kBlockK"] == _launch.CUDA_BLOCK_K
    assert consts["kStages"] == _launch.CUDA_STAGES
    assert consts["kStagesWgmma"] == _launch.CUDA_STAGES_WGMMA
    assert consts["kChunkD"] == _launch.CUDA_CHUNK_D


@pytest.mark.parametrize("n", [256, 1024, 8192])
@pytest.mark.parametrize("kernel", ["fwd mma.sync", "fwd wgmma", "bwd"])
def test_cuda_plans_fit_half_of_l2(n, kernel):
    """With the weights loaded evict_first (csrc/kernels.cuh L2Hint), a CUDA split holds only
    its in-flight W slices (the mma.sync forward's ring of ``CUDA_STAGES``, the sm_90a wgmma
    forward's of ``CUDA_STAGES_WGMMA``, the backward's W chunks), so forward and backward waves
    fit L2/2 at the GPU shape (bf16, D=3584, V=152064, 132 SMs) and in the few-rows case;
    holding whole W tiles (no hint) they did not."""
    backward = kernel == "bwd"
    h_row, w_window = _launch.cuda_plan_inputs(
        3584, 3584, True, backward=backward, wgmma=kernel == "fwd wgmma"
    )
    if not backward:  # the ring of the forward that runs: its slices of kBlockK
        stages = _launch.CUDA_STAGES_WGMMA if kernel == "fwd wgmma" else _launch.CUDA_STAGES
        assert w_window == stages * 128 * _launch.CUDA_BLOCK_K * 2
    assert w_window <= 2 * 128 * 64 * 2
    p = _launch.plan(n, 152064, 128, 128, h_row_bytes=h_row, w_window=w_window, per_wave=132,
                     l2=50 << 20, tiles_per_program=1 if backward else None)  # fmt: skip
    assert p.fits, p
    whole = _launch.plan(
        n,
        152064,
        128,
        128,
        h_row_bytes=h_row,
        w_window=128 * 3584 * 2,
        per_wave=132,
        l2=50 << 20,
        tiles_per_program=1 if backward else None,
    )
    assert whole.working_set > p.working_set


@pytest.mark.parametrize("row_blocks,cols", [(1, 1), (5, 3), (64, 33), (7, 1188), (13, 2)])
@pytest.mark.parametrize("group", [1, 2, 3, 8, 64])
def test_grouped_order_covers_every_program_once(row_blocks, cols, group):
    order = _order(row_blocks, cols, min(group, row_blocks))
    assert sorted(order) == [(r, c) for r in range(row_blocks) for c in range(cols)]


@pytest.mark.parametrize("row_blocks,cols", [(64, 33), (3, 1188), (64, 2), (10, 9)])
@pytest.mark.parametrize("group", [1, 4, 13, 64])
@pytest.mark.parametrize("per_wave", [1, 132, 264])
def test_wave_footprint_is_what_the_first_wave_touches(row_blocks, cols, group, per_wave):
    """The row blocks and columns of the first ``per_wave`` programs (the steady state of a
    group) are what ``wave_footprint`` counts: the working set is sized from it."""
    g = min(group, row_blocks)
    wave = _order(row_blocks, cols, g)[:per_wave]
    rows = len({r for r, _ in wave})
    used = len({c for _, c in wave})
    assert _launch.wave_footprint(row_blocks, cols, per_wave, g) == (rows, used)


def test_plan_at_the_spec_shape_fills_whole_waves_within_half_of_l2():
    """bf16, N=8192, D=3584 (policy + reference), V=152064, 128 x 128 tiles, 132 SMs: the
    grid is whole waves, every split owns a tile, the wave working set fits L2/2."""
    h_row = 2 * 3584 * 2
    w_window = 3 * 128 * 64 * 2  # 3 stages of 128 x 64 bf16 W slices (evict_first)
    p = _launch.plan(8192, 152064, 128, 128, h_row_bytes=h_row, w_window=w_window,
                     per_wave=132, l2=50 << 20)  # fmt: skip
    assert p.fits and p.working_set <= (50 << 20) // 2
    assert p.programs % 132 == 0 and p.waves * 132 == p.programs, p
    assert (p.splits - 1) * p.tiles_per_split < p.n_tiles <= p.splits * p.tiles_per_split
    rows, cols = _launch.wave_footprint(p.row_blocks, p.splits, 132, p.group)
    assert p.working_set == rows * 128 * h_row + cols * w_window
    # Without the evict_first window (whole W tiles held) no order fits half of the L2:
    # 2 sqrt(132 x h_block x w_tile) > 25 MiB, so the plan takes the smallest working set.
    whole = _launch.plan(8192, 152064, 128, 128, h_row_bytes=h_row, w_window=128 * 3584 * 2,
                         per_wave=132, l2=50 << 20)  # fmt: skip
    assert not whole.fits and whole.working_set < 32e6


def test_plan_few_rows_and_backward_grids():
    h_row, w_window = 2 * 3584 * 2, 3 * 128 * 64 * 2
    few = _launch.plan(256, 152064, 128, 128, h_row_bytes=h_row, w_window=w_window,
                       per_wave=132, l2=50 << 20)  # fmt: skip
    assert few.group == few.row_blocks == 2 and few.fits  # every row block in one group
    assert few.programs >= 132 and few.programs % 132 == 0, few
    # Whole W tiles held (a kernel without an evict_first hint): 66 splits do not fit L2/2,
    # yet the grid still fills the 132 SMs rather than idling them to fit.
    cuda = _launch.plan(256, 152064, 128, 128, h_row_bytes=h_row, w_window=128 * 3584 * 2,
                        per_wave=132, l2=50 << 20)  # fmt: skip
    assert cuda.programs >= 132 and not cuda.fits, cuda
    bwd = _launch.plan(8192, 16384, 128, 128, h_row_bytes=h_row, w_window=w_window,
                       per_wave=132, l2=50 << 20, tiles_per_program=1)  # fmt: skip
    assert bwd.splits == bwd.n_tiles == 128 and bwd.tiles_per_split == 1 and bwd.fits
    forced = _launch.plan(100, 1000, 16, 64, h_row_bytes=64, w_window=64, per_wave=1,
                          l2=1 << 20, splits=3)  # fmt: skip
    assert forced.splits == 3 and forced.tiles_per_split == 6
