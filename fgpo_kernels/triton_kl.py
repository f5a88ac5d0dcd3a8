"""Triton implementation of the fused token statistics (contract: ``_backend.py``).

Math (row i, vocabulary index j, T = temperature; p = softmax z, r = softmax zr):
    z = h W^T / T,  zr = hr Wr^T / T,  lse = logsumexp z,  lser = logsumexp zr
    streaming over vocabulary tiles with running maxima m, mr and scaled sums
        s = sum e^(z - m),  sr = sum e^(zr - mr),
        A = sum e^(z - m) (z - zr),  B = sum e^(zr - mr) (zr - z)
    (all four rescaled by e^(m_old - m_new) when a maximum moves), then
        lse = m + log s,  rkl = A / s - lse + lser,  fkl = B / sr - lser + lse.
Gradients w.r.t. the logits (d = log p - log r; the one-hot parts are added by the caller):
        G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p
        Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r
        dh = G W / T,  dW = G^T h / T,  dhr = Gr Wr / T,  dWr = Gr^T hr / T.

Triton kernel design
--------------------
Forward (``_fwd_kernel``): a 2-D grid (row blocks, vocabulary splits). Each program owns
BLOCK_N rows and a contiguous run of vocabulary tiles of BLOCK_V columns; for each tile it
computes the logit tiles with ``tl.dot`` over BLOCK_D chunks of D (fp32 accumulators; when the
reference shares W, each W chunk is loaded once and feeds both dots) and folds the tile into the
per-row online statistics above. Each program writes its partial (m, s[, mr, sr, A, B]) for its
(row, split) pair; a few torch ops on (N, splits) tensors merge them with the usual
log-sum-exp rescaling. Splitting the vocabulary is what fills the GPU in the common case of few
rows (hundreds of masked positions) and a huge V: the number of splits is chosen so that
row blocks x splits is about a few waves of SMs, and row blocks are the fastest grid axis so the
programs running at the same time read the same W tiles (W is read from HBM about once).

Backward: two modes, chosen by env FGPO_TRITON_BWD (or ``backward(mode=...)``); both form G (and
Gr) tile by tile with the same code (``_tile_grads``): recompute the logit tiles, then G from the
saved per-row lse, lser, fkl, rkl and the incoming per-row gradients, zero outside the valid
rows/columns, rounded to the input dtype (as the materialized path rounds its logit gradient).
Every gradient nobody asked for is skipped (no dW work at all for LoRA).

"gblock" (default): for each vocabulary chunk [v0, v0 + Vc):
  1. ``_g_kernel``, one program per (row block, tile of the chunk) in grouped order (GROUP_N row
     blocks sweep the chunk's tiles together, so W and H tiles are reused from L2), writes G / T
     (and Gr / T) into a (rows x Vc) buffer in the input dtype (1/T folded in before rounding);
  2. library GEMMs (cuBLAS on a GPU): dh += G W_c, dW_c = G^T h (and dhr += Gr Wr_c,
     dWr_c = Gr^T hr). Shared weight: G rows sit on top of Gr rows in one buffer, so dh and dhr
     are ONE GEMM against W_c and the shared dW_c = [G; Gr]^T [h; hr] is one GEMM with K = 2N.
  dW_c is written once per chunk (no atomics, deterministic). dh sums over chunks in fp32: with
  16-bit CUDA operands cuBLAS reads the old sum and writes the new one in fp32
  (``addmm(..., out_dtype=float32)`` into a second buffer, the two swap); without that (CPU,
  older torch) each chunk's product is rounded to the input dtype and added in fp32.
  Vc is a multiple of BLOCK_V with (buffer rows) x Vc <= 2^25 elements (env
  FGPO_TRITON_GBLOCK_ELEMS) and Vc <= 16384: the buffer is rows x V_block, never rows x V.
"atomic": one program per (row block, vocabulary tile) of the whole vocabulary, grouped order;
  after forming G it loops over D in BLOCK_D chunks: dh[rows, chunk] += G W[tile, chunk] / T and
  dW[tile, chunk] += G^T h[rows, chunk] / T with fp32 ``tl.atomic_add`` into fp32 buffers (as
  Cut Cross-Entropy does). Nothing of size rows x V_block exists at all.

Why gblock is the default (estimates; no GPU has timed either mode yet): at N = 8192, D = 3584,
V = 152064 the atomic mode issues N*D*V*(1/BLOCK_V + 1/BLOCK_N) ~ 1e11 fp32 atomic adds for dh
and dW alone (1.4e11 with dhr), likely slower than the ~5e13 flops of matmuls themselves. gblock
replaces them by G traffic (written once, read twice: 3 * N * V * 2 bytes per buffer, ~15 GB for G
and Gr, ~5 ms at H100 bandwidth) plus the fp32 dh sum read and written once per chunk
(2 * rows * D * 4 bytes per chunk, ~35 GB at Vc = 2048: read and written by the GEMM epilogue;
how much of it shows is for a GPU to measure; doubling the budget halves it), and runs 2/3 of the
backward's flops (4 of the 6 matmuls with a reference) at cuBLAS speed. Extra
memory: the buffer (64 MiB at the default budget in bf16) and the second fp32 dh sum. With few
rows (N = 300) the atomic count is ~25x smaller, so there the atomic mode may be competitive:
``benchmarks/notes_triton.md`` lists what a GPU session must measure.

Offsets are int64 (row * stride exceeds 2^31 at V = 152064, N = 16384); every load is masked, so
any N, V, D works. GPU block sizes come from one small explicit table, GPU_CONFIGS (no
autotuning); the tests compile every entry ahead of time for sm_80 and sm_90 and check that none
spills registers and that 16-bit inputs use mma / wgmma. fp32 inputs use IEEE fp32 dots (exact,
no TF32; FMA, so smaller tiles); bf16/fp16 inputs use tensor cores with fp32 accumulation. Under
TRITON_INTERPRET=1 (how CI runs these kernels on CPU) large vocabulary tiles keep the interpreter
fast: it pays per operation, not per element.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch import Tensor

from ._backend import Grads, Needs, RowGrads, RowStats
from ._util import sm_count as _sm_count
from ._util import triton_interpret as _interpreting

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _old_interpreter() -> bool:
    import numpy as np

    def major_minor(v: str) -> tuple:
        return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())

    return major_minor(triton.__version__) < (3, 7) and major_minor(np.__version__) >= (2,)


def probe() -> dict:
    if triton is None:
        return {
            "available": False,
            "built": False,
            "reason": f"triton not importable: {_IMPORT_ERROR}",
        }
    if not torch.cuda.is_available() and not _interpreting():
        return {
            "available": False,
            "built": True,
            "reason": "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)",
        }
    if _interpreting() and _old_interpreter():
        return {
            "available": False,
            "built": True,
            "reason": f"triton {triton.__version__}'s interpreter cannot run loops with runtime "
            "bounds under numpy 2 (needs triton >= 3.7 to run on CPU)",
        }
    mode = "interpreter (TRITON_INTERPRET=1)" if _interpreting() else "CUDA"
    return {"available": True, "built": True, "reason": f"triton {triton.__version__}, {mode}"}


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
    "bwd": KernelConfig(64, 128, 32, 8, 3),  # bf16/fp16
    "fwd_fp32": KernelConfig(64, 64, 32, 8, 2),
    "fwd_fp32_logprob": KernelConfig(64, 64, 32, 8, 1),
    "bwd_fp32": KernelConfig(64, 64, 16, 8, 1),
    "g": KernelConfig(64, 128, 64, 8, 3),  # bf16/fp16 gblock G tiles
    "g_fp32": KernelConfig(64, 64, 32, 8, 2),
}
# Rows at or below which the 16-bit forward uses the smaller row block (less padding).
_FEW_ROWS = 1024
_BWD_GROUP_N = 8
# Backward modes (env FGPO_TRITON_BWD): "gblock" writes the logit gradient of one vocabulary chunk
# and runs library GEMMs; "atomic" accumulates every tile with fp32 atomics (see the docstring).
BWD_MODES = ("gblock", "atomic")
# gblock: elements of the (rows x chunk) gradient buffer(s) at most (env FGPO_TRITON_GBLOCK_ELEMS),
# and a chunk never wider than this many columns (the buffer never spans a whole LM vocabulary).
_GBLOCK_ELEMS = 1 << 25
_GBLOCK_MAX_COLS = 16384

if triton is not None:

    @triton.jit
    def _tile_logits(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # hidden (N, D), ref hidden (N, DR), weights (V, D)/(V, DR)
        rows, cols, row_ok, col_ok,  # int64 row / column indices of this tile and their masks
        D, DR, stride_h, stride_hr, stride_w, stride_wr,  # reduction sizes and row strides
        inv_t,  # 1 / temperature
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_REF: tl.constexpr,  # compute the reference tile too
        SHARED: tl.constexpr,  # the reference uses w (one load of each W chunk for both dots)
        PREC: tl.constexpr, PREC_R: tl.constexpr,  # dot input precision ("ieee" for fp32)
    ):  # fmt: skip
        """(z, zr) fp32 tiles (BLOCK_N, BLOCK_V), already divided by T; masked entries are 0."""
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        accr = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + offs_d
            dk_ok = dk < D
            x = tl.load(
                h_ptr + rows[:, None] * stride_h + dk[None, :],
                mask=row_ok[:, None] & dk_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + cols[None, :] * stride_w + dk[:, None],
                mask=dk_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(x, wt, acc, input_precision=PREC)
            if HAS_REF:
                if SHARED:
                    xr = tl.load(
                        hr_ptr + rows[:, None] * stride_hr + dk[None, :],
                        mask=row_ok[:, None] & dk_ok[None, :],
                        other=0.0,
                    )
                    accr = tl.dot(xr, wt, accr, input_precision=PREC_R)
        if HAS_REF:
            if not SHARED:
                for d0 in range(0, DR, BLOCK_D):
                    dk = d0 + offs_d
                    dk_ok = dk < DR
                    xr = tl.load(
                        hr_ptr + rows[:, None] * stride_hr + dk[None, :],
                        mask=row_ok[:, None] & dk_ok[None, :],
                        other=0.0,
                    )
                    wrt = tl.load(
                        wr_ptr + cols[None, :] * stride_wr + dk[:, None],
                        mask=dk_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    accr = tl.dot(xr, wrt, accr, input_precision=PREC_R)
        return acc * inv_t, accr * inv_t

    @triton.jit
    def _grouped_pid(n_row_blocks, n_col_blocks, GROUP_N: tl.constexpr):
        """(row block, column block) of this program in grouped order: GROUP_N consecutive row
        blocks walk the column blocks together, so their W and H tiles are reused from L2."""
        pid = tl.program_id(0)
        per_group = GROUP_N * n_col_blocks
        first = (pid // per_group) * GROUP_N
        group_size = tl.minimum(n_row_blocks - first, GROUP_N)
        pid_n = first + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size
        return pid_n, pid_v

    @triton.jit
    def _tile_grads(
        z, zr,  # fp32 logit tiles (BLOCK_N, BLOCK_V) from _tile_logits
        stats_ptr,  # (8, N) fp32: lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr
        rows, row_ok, ok,  # int64 rows, their mask, the (row, column) validity mask
        N,
        HAS_REF: tl.constexpr,
    ):  # fmt: skip
        """fp32 (G, Gr) tiles of the logit gradient (zero outside ``ok``; Gr = G without a
        reference), from the saved per-row statistics and incoming per-row gradients."""
        lse = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        g_lp = tl.load(stats_ptr + 6 * N + rows, mask=row_ok, other=0.0)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        if HAS_REF:
            lser = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
            fkl = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
            rkl = tl.load(stats_ptr + 3 * N + rows, mask=row_ok, other=0.0)
            g_fkl = tl.load(stats_ptr + 4 * N + rows, mask=row_ok, other=0.0)
            g_rkl = tl.load(stats_ptr + 5 * N + rows, mask=row_ok, other=0.0)
            g_lpr = tl.load(stats_ptr + 7 * N + rows, mask=row_ok, other=0.0)
            logr = zr - lser[:, None]
            r = tl.exp(logr)
            d = logp - logr
            g = (
                g_fkl[:, None] * (p - r)
                + g_rkl[:, None] * p * (d - rkl[:, None])
                - g_lp[:, None] * p
            )
            gr = (
                g_fkl[:, None] * r * (-d - fkl[:, None])
                + g_rkl[:, None] * (r - p)
                - g_lpr[:, None] * r
            )
            g = tl.where(ok, g, 0.0)
            gr = tl.where(ok, gr, 0.0)
        else:
            g = tl.where(ok, -g_lp[:, None] * p, 0.0)
            gr = g
        return g, gr

    @triton.jit
    def _fwd_kernel(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # inputs (see _tile_logits)
        part_ptr,  # (6, N, n_splits) fp32 partials: m, s, mr, sr, A, B per (row, split)
        N, V, D, DR, stride_h, stride_hr, stride_w, stride_wr,
        inv_t,  # 1 / temperature
        tiles_per_split,  # vocabulary tiles owned by one program
        n_splits,  # grid size along axis 1
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        neg_inf = float("-inf")
        m = tl.full((BLOCK_N,), neg_inf, dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        mr = tl.full((BLOCK_N,), neg_inf, dtype=tl.float32)
        sr = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        # The last split may own fewer real tiles; its extra tiles are fully masked (they change
        # nothing) and cost no wall time, since the other programs run as many iterations.
        for i in range(0, tiles_per_split):
            t = pid_s * tiles_per_split + i
            cols = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_ok = cols < V
            z, zr = _tile_logits(
                h_ptr, hr_ptr, w_ptr, wr_ptr, rows, cols, row_ok, col_ok,
                D, DR, stride_h, stride_hr, stride_w, stride_wr, inv_t,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
            )  # fmt: skip
            if HAS_REF:
                diff = tl.where(col_ok[None, :], z - zr, 0.0)  # before masking: no inf - inf
            z = tl.where(col_ok[None, :], z, neg_inf)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(e, axis=1)
            if HAS_REF:
                zr = tl.where(col_ok[None, :], zr, neg_inf)
                mr_new = tl.maximum(mr, tl.max(zr, axis=1))
                alpha_r = tl.exp(mr - mr_new)
                er = tl.exp(zr - mr_new[:, None])
                sr = sr * alpha_r + tl.sum(er, axis=1)
                a = a * alpha + tl.sum(e * diff, axis=1)
                b = b * alpha_r - tl.sum(er * diff, axis=1)
                mr = mr_new
            m = m_new
        out = part_ptr + rows * n_splits + pid_s  # rows is int64
        plane = N * n_splits  # one statistic's (N, n_splits) plane; step plane by plane
        tl.store(out, m, mask=row_ok)
        out += plane
        tl.store(out, s, mask=row_ok)
        if HAS_REF:
            out += plane
            tl.store(out, mr, mask=row_ok)
            out += plane
            tl.store(out, sr, mask=row_ok)
            out += plane
            tl.store(out, a, mask=row_ok)
            out += plane
            tl.store(out, b, mask=row_ok)

    @triton.jit
    def _bwd_kernel(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # inputs (see _tile_logits)
        stats_ptr,  # (8, N) fp32: lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr
        dh_ptr, dhr_ptr, dw_ptr, dwr_ptr,  # fp32 contiguous gradient buffers (atomic adds)
        N, V, D, DR, stride_h, stride_hr, stride_w, stride_wr,
        inv_t,  # 1 / temperature
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        GROUP_N: tl.constexpr,  # row blocks that sweep the vocabulary together (L2 reuse)
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
        DO_DH: tl.constexpr, DO_DW: tl.constexpr,  # policy gradients wanted
        DO_DHR: tl.constexpr, DO_DWR: tl.constexpr,  # reference gradients wanted (DWR: separate)
    ):  # fmt: skip
        # Grouped program order: GROUP_N consecutive row blocks walk the vocabulary tiles together.
        pid_n, pid_v = _grouped_pid(tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)

        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        row_ok = rows < N
        col_ok = cols < V
        ok = row_ok[:, None] & col_ok[None, :]
        z, zr = _tile_logits(
            h_ptr, hr_ptr, w_ptr, wr_ptr, rows, cols, row_ok, col_ok,
            D, DR, stride_h, stride_hr, stride_w, stride_wr, inv_t,
            BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
        )  # fmt: skip
        g, gr = _tile_grads(z, zr, stats_ptr, rows, row_ok, ok, N, HAS_REF)
        g = g.to(h_ptr.dtype.element_ty)
        gr = gr.to(hr_ptr.dtype.element_ty)

        offs_d = tl.arange(0, BLOCK_D)
        # Policy weight chunks: dh (G W), dW (G^T h [+ Gr^T hr when shared]), dhr when shared.
        if DO_DH or DO_DW or (SHARED and DO_DHR):
            for d0 in range(0, D, BLOCK_D):
                dk = d0 + offs_d
                dk_ok = dk < D
                rd_ok = row_ok[:, None] & dk_ok[None, :]
                cd_ok = col_ok[:, None] & dk_ok[None, :]
                if DO_DH or (SHARED and DO_DHR):
                    wc = tl.load(
                        w_ptr + cols[:, None] * stride_w + dk[None, :], mask=cd_ok, other=0.0
                    )
                    if DO_DH:
                        part = tl.dot(g, wc, input_precision=PREC) * inv_t
                        tl.atomic_add(
                            dh_ptr + rows[:, None] * D + dk[None, :],
                            part,
                            mask=rd_ok,
                            sem="relaxed",
                        )
                    if SHARED and DO_DHR:
                        part = tl.dot(gr, wc, input_precision=PREC_R) * inv_t
                        tl.atomic_add(
                            dhr_ptr + rows[:, None] * D + dk[None, :],
                            part,
                            mask=rd_ok,
                            sem="relaxed",
                        )
                if DO_DW:
                    x = tl.load(
                        h_ptr + rows[:, None] * stride_h + dk[None, :], mask=rd_ok, other=0.0
                    )
                    part = tl.dot(tl.trans(g), x, input_precision=PREC)
                    if SHARED and HAS_REF:
                        xr = tl.load(
                            hr_ptr + rows[:, None] * stride_hr + dk[None, :], mask=rd_ok, other=0.0
                        )
                        part = tl.dot(tl.trans(gr), xr, part, input_precision=PREC_R)
                    tl.atomic_add(
                        dw_ptr + cols[:, None] * D + dk[None, :],
                        part * inv_t,
                        mask=cd_ok,
                        sem="relaxed",
                    )
        # Separate reference weight: dhr (Gr Wr) and dWr (Gr^T hr).
        if HAS_REF and not SHARED and (DO_DHR or DO_DWR):
            for d0 in range(0, DR, BLOCK_D):
                dk = d0 + offs_d
                dk_ok = dk < DR
                rd_ok = row_ok[:, None] & dk_ok[None, :]
                cd_ok = col_ok[:, None] & dk_ok[None, :]
                if DO_DHR:
                    wc = tl.load(
                        wr_ptr + cols[:, None] * stride_wr + dk[None, :], mask=cd_ok, other=0.0
                    )
                    part = tl.dot(gr, wc, input_precision=PREC_R) * inv_t
                    tl.atomic_add(
                        dhr_ptr + rows[:, None] * DR + dk[None, :], part, mask=rd_ok, sem="relaxed"
                    )
                if DO_DWR:
                    xr = tl.load(
                        hr_ptr + rows[:, None] * stride_hr + dk[None, :], mask=rd_ok, other=0.0
                    )
                    part = tl.dot(tl.trans(gr), xr, input_precision=PREC_R) * inv_t
                    tl.atomic_add(
                        dwr_ptr + cols[:, None] * DR + dk[None, :], part, mask=cd_ok, sem="relaxed"
                    )

    @triton.jit
    def _g_kernel(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # inputs (see _tile_logits)
        stats_ptr,  # (8, N) fp32: lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr
        g_ptr, gr_ptr,  # (N, >= chunk_v) buffers in the input dtypes: G / T and Gr / T
        N, V, D, DR, stride_h, stride_hr, stride_w, stride_wr, stride_g, stride_gr,
        inv_t,  # 1 / temperature
        v0,  # first vocabulary column of the chunk
        chunk_v,  # columns in the chunk (v0 + chunk_v <= V)
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        GROUP_N: tl.constexpr,  # row blocks that sweep the chunk's tiles together (L2 reuse)
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
        DO_G: tl.constexpr, DO_GR: tl.constexpr,  # which gradient tiles to write
    ):  # fmt: skip
        """gblock backward, step 1: the logit-gradient tiles of one vocabulary chunk, written to
        a (rows x chunk) buffer for the library GEMMs (already divided by T)."""
        pid_n, pid_v = _grouped_pid(tl.cdiv(N, BLOCK_N), tl.cdiv(chunk_v, BLOCK_V), GROUP_N)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        cols = v0 + local
        row_ok = rows < N
        col_ok = local < chunk_v
        ok = row_ok[:, None] & col_ok[None, :]
        z, zr = _tile_logits(
            h_ptr, hr_ptr, w_ptr, wr_ptr, rows, cols, row_ok, col_ok,
            D, DR, stride_h, stride_hr, stride_w, stride_wr, inv_t,
            BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
        )  # fmt: skip
        g, gr = _tile_grads(z, zr, stats_ptr, rows, row_ok, ok, N, HAS_REF)
        if DO_G:
            tl.store(
                g_ptr + rows[:, None] * stride_g + local[None, :],
                (g * inv_t).to(g_ptr.dtype.element_ty),
                mask=ok,
            )
        if DO_GR:
            tl.store(
                gr_ptr + rows[:, None] * stride_gr + local[None, :],
                (gr * inv_t).to(gr_ptr.dtype.element_ty),
                mask=ok,
            )


# ------------------------------------------------------------------------------------ host side

_PREC = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}


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


def gpu_config_name(kind: str, n: int, dtype: torch.dtype, has_ref: bool) -> str:
    """The GPU_CONFIGS entry used for a launch (``kind``: "fwd", "bwd" or "g")."""
    if kind not in ("fwd", "bwd", "g"):
        raise ValueError(f"gpu_config_name: kind must be 'fwd', 'bwd' or 'g', got {kind!r}")
    if dtype == torch.float32:
        if kind == "fwd" and not has_ref:
            return "fwd_fp32_logprob"
        return f"{kind}_fp32"
    if kind == "fwd":
        return "fwd_few_rows" if n <= _FEW_ROWS else "fwd"
    return kind


def _config(kind: str, n: int, d: int, dtype: torch.dtype, has_ref: bool) -> KernelConfig:
    if _interpreting():
        return _interp_config(n, d)
    return GPU_CONFIGS[gpu_config_name(kind, n, dtype, has_ref)]


def _splits(n_row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Vocabulary splits: enough programs for ~4 per SM (few on CPU / the interpreter)."""
    if _interpreting() or device.type != "cuda":
        target = 2
    else:
        target = -(-4 * _sm_count(device) // n_row_blocks)
    return max(1, min(n_tiles, target))


def _check(h: Tensor, name: str) -> None:
    if h.dtype not in _PREC:
        raise TypeError(f"impl 'triton' supports float32/bfloat16/float16 {name}, got {h.dtype}")
    if h.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {name} on {h.device}"
        )
    if h.stride(-1) != 1:
        raise ValueError(f"impl 'triton' needs {name} with unit stride in the last dimension")


def _prepare(h, hr, w, wr):
    h, w = h.contiguous(), w.contiguous()
    hr = None if hr is None else hr.contiguous()
    wr = None if wr is None else wr.contiguous()
    for x, name in ((h, "h"), (hr, "hr"), (w, "w"), (wr, "wr")):
        if x is not None:
            _check(x, name)
    return h, hr, w, wr


def _on_device(x: Tensor):
    """Launch on the tensors' GPU, not whichever one is current."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _launch_opts(cfg: KernelConfig) -> dict:
    return {} if _interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def forward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    *, splits: int | None = None, config: KernelConfig | None = None,
) -> RowStats:  # fmt: skip
    """Per-row (lse, lser, fkl, rkl) fp32; ``splits``/``config`` override the choice (tests)."""
    h, hr, w, wr = _prepare(h, hr, w, wr)
    n, d = h.shape
    v = w.shape[0]
    has_ref, shared = hr is not None, wr is None
    dr = hr.shape[1] if has_ref else d
    cfg = config or _config("fwd", n, max(d, dr), h.dtype, has_ref)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    n_tiles = triton.cdiv(v, cfg.block_v)
    s = splits or _splits(n_row_blocks, n_tiles, h.device)
    s = max(1, min(int(s), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, s)
    s = triton.cdiv(n_tiles, tiles_per_split)  # every split owns at least one tile
    part = torch.empty((6 if has_ref else 2, n, s), dtype=torch.float32, device=h.device)
    hr_, wr_ = (hr if has_ref else h), (w if shared else wr)
    with _on_device(h):
        _fwd_kernel[(n_row_blocks, s)](
            h, hr_, w, wr_, part,
            n, v, d, dr, h.stride(0), hr_.stride(0), w.stride(0), wr_.stride(0),
            1.0 / temperature, tiles_per_split, s,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            HAS_REF=has_ref, SHARED=shared, PREC=_PREC[h.dtype], PREC_R=_PREC[hr_.dtype],
            **_launch_opts(cfg),
        )  # fmt: skip
    lse = _merge(part[0], part[1])
    if not has_ref:
        return RowStats(lse, None, None, None)
    lser = _merge(part[2], part[3])
    top = part[0].amax(dim=1, keepdim=True)
    top_r = part[2].amax(dim=1, keepdim=True)
    # A/s and B/sr, merged over splits with the same rescaling as s and sr.
    scale, scale_r = torch.exp(part[0] - top), torch.exp(part[2] - top_r)
    a_over_s = (part[4] * scale).sum(1) / (part[1] * scale).sum(1)
    b_over_sr = (part[5] * scale_r).sum(1) / (part[3] * scale_r).sum(1)
    gap = lser - lse
    return RowStats(lse, lser, b_over_sr - gap, a_over_s + gap)


def _merge(m: Tensor, s: Tensor) -> Tensor:
    """log-sum-exp over splits of per-split (max, scaled sum)."""
    if m.shape[1] == 1:
        return m[:, 0] + torch.log(s[:, 0])
    top = m.amax(dim=1, keepdim=True)
    return top[:, 0] + torch.log((s * torch.exp(m - top)).sum(1))


def bwd_mode(mode: str | None = None) -> str:
    """The backward mode: ``mode`` if given, else env FGPO_TRITON_BWD, else "gblock"."""
    chosen = mode if mode is not None else (os.environ.get("FGPO_TRITON_BWD") or "gblock")
    if chosen not in BWD_MODES:
        src = "mode" if mode is not None else "FGPO_TRITON_BWD"
        raise ValueError(f"impl 'triton': {src} must be one of {BWD_MODES}, got {chosen!r}")
    return chosen


def _gblock_elems(chunk_elems: int | None) -> int:
    if chunk_elems is not None:
        value, src = chunk_elems, "chunk_elems"
    else:
        raw, src = os.environ.get("FGPO_TRITON_GBLOCK_ELEMS"), "FGPO_TRITON_GBLOCK_ELEMS"
        if not raw:
            return _GBLOCK_ELEMS
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"impl 'triton': {src} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"impl 'triton': {src} must be positive, got {value}")
    return int(value)


def chunk_columns(rows: int, v: int, block_v: int, budget: int) -> int:
    """gblock vocabulary chunk width: a multiple of ``block_v`` with rows x width <= budget
    (at least one tile), at most _GBLOCK_MAX_COLS, no wider than V rounded up to a tile."""
    vc = budget // max(1, rows) // block_v * block_v
    cap = max(block_v, _GBLOCK_MAX_COLS // block_v * block_v)
    return max(block_v, min(vc, cap, -(-v // block_v) * block_v))


def backward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    stats: RowStats, grads: RowGrads, need: Needs,
    *, config: KernelConfig | None = None, mode: str | None = None,
    chunk_elems: int | None = None,
) -> Grads:  # fmt: skip
    """Contract of ``_backend.py``. ``mode`` ("gblock" / "atomic", default env FGPO_TRITON_BWD
    or gblock), ``config`` (kernel tiles) and ``chunk_elems`` (gblock buffer budget, default env
    FGPO_TRITON_GBLOCK_ELEMS or 2^25) override the defaults (tests, benchmarks)."""
    args = (h, hr, w, wr, temperature, RowStats(*stats), RowGrads(*grads), Needs(*need))
    if bwd_mode(mode) == "gblock":
        return _backward_gblock(*args, config=config, chunk_elems=_gblock_elems(chunk_elems))
    return _backward_atomic(*args, config=config)


def _row_inputs(n: int, dev, stats: RowStats, grads: RowGrads) -> Tensor:
    """(8, N) fp32 per-row inputs of the gradient kernels (None = zero): lse, lser, fkl, rkl,
    g_fkl, g_rkl, g_lp, g_lpr."""
    zero = torch.zeros(n, dtype=torch.float32, device=dev)
    return torch.stack([zero if x is None else x.to(torch.float32) for x in (*stats, *grads)])


def _backward_atomic(h, hr, w, wr, temperature, stats, grads, need, *, config=None) -> Grads:
    h, hr, w, wr = _prepare(h, hr, w, wr)
    n, d = h.shape
    v = w.shape[0]
    has_ref, shared = hr is not None, wr is None
    dr = hr.shape[1] if has_ref else d
    need_h, need_hr, need_w, need_wr = need.possible(hr, wr)
    dev = h.device

    def buf(rows: int, cols: int, need: bool) -> Tensor | None:
        return torch.zeros((rows, cols), dtype=torch.float32, device=dev) if need else None

    dh, dw = buf(n, d, need_h), buf(v, d, need_w)
    dhr, dwr = buf(n, dr, need_hr), buf(v, dr, need_wr)
    if not (need_h or need_w or need_hr or need_wr):
        return Grads(dh, dhr, dw, dwr)
    per_row = _row_inputs(n, dev, stats, grads)
    cfg = config or _config("bwd", n, max(d, dr), h.dtype, has_ref)
    hr_, wr_ = (hr if has_ref else h), (w if shared else wr)
    dummy = per_row  # stands in for the gradient buffers nobody asked for (never touched)
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
    with _on_device(h):
        _bwd_kernel[grid](
            h, hr_, w, wr_, per_row,
            dummy if dh is None else dh, dummy if dhr is None else dhr,
            dummy if dw is None else dw, dummy if dwr is None else dwr,
            n, v, d, dr, h.stride(0), hr_.stride(0), w.stride(0), wr_.stride(0),
            1.0 / temperature,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=_BWD_GROUP_N,
            HAS_REF=has_ref, SHARED=shared, PREC=_PREC[h.dtype], PREC_R=_PREC[hr_.dtype],
            DO_DH=need_h, DO_DW=need_w, DO_DHR=need_hr, DO_DWR=need_wr,
            **_launch_opts(cfg),
        )  # fmt: skip
    return Grads(dh, dhr, dw, dwr)


# ------------------------------------------------------------------- gblock backward: host side

_OUT_DTYPE_GEMM: dict = {}  # device -> whether torch.mm / addmm accept out_dtype=float32 there


def _fp32_out_gemm(a: Tensor) -> bool:
    """16-bit CUDA operands and a torch whose cuBLAS GEMMs can write fp32 (``out_dtype``)."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return False
    key = (str(a.device), a.dtype)
    if key not in _OUT_DTYPE_GEMM:
        try:
            x = torch.ones((2, 2), dtype=a.dtype, device=a.device)
            out = torch.empty((2, 2), dtype=torch.float32, device=a.device)
            torch.mm(x, x, out_dtype=torch.float32, out=out)
            res = torch.addmm(out, x, x, out_dtype=torch.float32)
            _OUT_DTYPE_GEMM[key] = bool((res == 4).all())
        except (TypeError, RuntimeError):
            _OUT_DTYPE_GEMM[key] = False
    return _OUT_DTYPE_GEMM[key]


def _dense_on_cpu(a: Tensor) -> Tensor:
    """CPU torch (2.13) bf16 mm reads past the columns of a row-strided left operand (a column
    slice of a wider buffer) and returns NaN from the uninitialized padding: copy it dense."""
    return a.contiguous() if a.device.type == "cpu" else a


def _gemm_store(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (fp32) = a @ b."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif _fp32_out_gemm(a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)  # fp32 accumulate and store
    else:  # one rounding to the input dtype, like the materialized path
        out.copy_(torch.mm(_dense_on_cpu(a), b))


class _Acc:
    """An fp32 (rows, D) accumulator over vocabulary chunks: acc += a @ b.

    fp32 operands: in-place addmm. 16-bit CUDA operands: cuBLAS reads the old sum and writes
    the new one in fp32 (``addmm(..., out_dtype=float32)``) into a second buffer, then the two
    swap (no aliasing of input and output, no extra pass over the sum). Otherwise (CPU, or a
    torch without ``out_dtype``): the chunk's product is rounded to the input dtype, then added in
    fp32."""

    def __init__(self, rows: int, cols: int, device) -> None:
        self.sum = torch.zeros((rows, cols), dtype=torch.float32, device=device)
        self.spare: Tensor | None = None

    def add(self, a: Tensor, b: Tensor) -> None:
        if a.dtype == torch.float32:
            self.sum.addmm_(a, b)
        elif _fp32_out_gemm(a):
            if self.spare is None:
                self.spare = torch.empty_like(self.sum)
            torch.addmm(self.sum, a, b, out_dtype=torch.float32, out=self.spare)
            self.sum, self.spare = self.spare, self.sum
        else:
            self.sum.add_(torch.mm(_dense_on_cpu(a), b))


def _backward_gblock(
    h, hr, w, wr, temperature, stats, grads, need, *, config=None, chunk_elems=_GBLOCK_ELEMS
) -> Grads:
    """Per vocabulary chunk: a Triton kernel writes G / T (and Gr / T) for all rows in the input
    dtype, then library GEMMs do dh += G W_c, dW_c = G^T h (written once, no atomics)."""
    h, hr, w, wr = _prepare(h, hr, w, wr)
    n, d = h.shape
    v = w.shape[0]
    has_ref, shared = hr is not None, wr is None
    dr = hr.shape[1] if has_ref else d
    need_h, need_hr, need_w, need_wr = need.possible(hr, wr)
    dev = h.device
    do_g = need_h or need_w
    do_gr = has_ref and (need_hr or need_wr or (shared and need_w))
    if n == 0 or not (do_g or do_gr):
        z = [torch.zeros(shape, dtype=torch.float32, device=dev) if need else None
             for shape, need in (((n, d), need_h), ((n, dr), need_hr), ((v, d), need_w),
                                 ((v, dr), need_wr))]  # fmt: skip
        return Grads(*z)
    # Every chunk writes its rows of dW / dWr exactly once: no zero fill needed.
    dw = torch.empty((v, d), dtype=torch.float32, device=dev) if need_w else None
    dwr = torch.empty((v, dr), dtype=torch.float32, device=dev) if need_wr else None
    per_row = _row_inputs(n, dev, stats, grads)
    cfg = config or _config("g", n, max(d, dr), h.dtype, has_ref)
    hr_, wr_ = (hr if has_ref else h), (w if shared else wr)

    # Gradient buffers. Shared weight: one buffer, G rows on top of Gr rows, so the shared dW is
    # ONE GEMM over 2N rows (against [h; hr]) and dh, dhr one GEMM against the W chunk.
    g_rows = n if do_g else 0
    gr_rows = n if do_gr else 0
    vc = chunk_columns(g_rows + gr_rows, v, cfg.block_v, chunk_elems)
    if shared:
        buf = torch.empty((g_rows + gr_rows, vc), dtype=h.dtype, device=dev)
        gbuf, grbuf = buf[:g_rows], buf[g_rows:]
    else:
        gbuf = torch.empty((g_rows, vc), dtype=h.dtype, device=dev)
        grbuf = torch.empty((gr_rows, vc), dtype=hr_.dtype, device=dev)
    g_arg = gbuf if do_g else grbuf
    gr_arg = grbuf if do_gr else g_arg

    # Left operands (row ranges of the buffers) and accumulators of each GEMM.
    stacked = shared and need_h and need_hr  # dh and dhr: one GEMM of [G; Gr] with the W chunk
    if stacked:
        acc_h, acc_hr = _Acc(2 * n, d, dev), None
    else:
        acc_h = _Acc(n, d, dev) if need_h else None
        acc_hr = _Acc(n, dr, dev) if need_hr else None
    if shared and need_w and has_ref:
        w_rhs = torch.cat([h, hr])  # dW_c = [G; Gr]^T [h; hr]
    else:
        w_rhs = h

    n_row_blocks = triton.cdiv(n, cfg.block_n)
    opts = _launch_opts(cfg)
    with _on_device(h):
        for v0 in range(0, v, vc):
            vl = min(vc, v - v0)
            grid = (n_row_blocks * triton.cdiv(vl, cfg.block_v),)
            _g_kernel[grid](
                h, hr_, w, wr_, per_row, g_arg, gr_arg,
                n, v, d, dr, h.stride(0), hr_.stride(0), w.stride(0), wr_.stride(0),
                g_arg.stride(0), gr_arg.stride(0),
                1.0 / temperature, v0, vl,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                GROUP_N=_BWD_GROUP_N, HAS_REF=has_ref, SHARED=shared,
                PREC=_PREC[h.dtype], PREC_R=_PREC[hr_.dtype], DO_G=do_g, DO_GR=do_gr,
                **opts,
            )  # fmt: skip
            cols = slice(v0, v0 + vl)
            g_c = gbuf[:, :vl] if do_g else None
            gr_c = grbuf[:, :vl] if do_gr else None
            if shared:
                w_c = w[cols]
                if stacked:
                    acc_h.add(buf[:, :vl], w_c)
                else:
                    if need_h:
                        acc_h.add(g_c, w_c)
                    if need_hr:
                        acc_hr.add(gr_c, w_c)
                if need_w:
                    lhs = buf[:, :vl] if has_ref else g_c
                    _gemm_store(dw[cols], lhs.t(), w_rhs)
            else:
                if need_h:
                    acc_h.add(g_c, w[cols])
                if need_w:
                    _gemm_store(dw[cols], g_c.t(), h)
                if need_hr:
                    acc_hr.add(gr_c, wr[cols])
                if need_wr:
                    _gemm_store(dwr[cols], gr_c.t(), hr)
    if stacked:
        dh, dhr = acc_h.sum[:n], acc_h.sum[n:]
    else:
        dh = acc_h.sum if acc_h is not None else None
        dhr = acc_hr.sum if acc_hr is not None else None
    return Grads(dh, dhr, dw, dwr)
