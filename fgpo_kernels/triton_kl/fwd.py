"""Triton forward: per-row log-sum-exp and both KL directions, streaming over the vocabulary.

Math (row i; p = softmax z, r = softmax zr, T = temperature):
    z = h W^T / T,  zr = hr Wr^T / T; per vocabulary tile, with running maxima m, mr,
        s = sum e^(z - m),  sr = sum e^(zr - mr),
        A = sum e^(z - m) (z - zr),  B = sum e^(zr - mr) (zr - z)
    (all four rescaled by e^(m_old - m_new) when a maximum moves), then
        lse = m + log s,  rkl = A / s - lse + lser,  fkl = B / sr - lser + lse
    (``_backend.finish_kl``: lse - lser formed as (m - mr) + (log s - log sr)).
Grid: row blocks x vocabulary splits programs in the grouped order of ``_launch.py`` (groups of
row blocks, row block fastest, so one wave's H blocks and W tiles stay in L2); the split count
fills whole waves. Each program writes its partial statistics per (row, split); ``forward``
merges them over the splits (log-sum-exp rescaling) in a few torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import RowStats, finish_kl
from . import tune
from .common import DOT_PRECISION, on_device, prepare, tile_arg, tl, triton
from .configs import (
    KernelConfig,
    device_arch,
    gpu_config_name,
    grid_plan,
    launch_opts,
    named_config,
    tma_tiles,
)

if triton is not None:
    from .common import _grouped_pid, _store_tile, _tile_logits

    # Int arguments triton's launcher must not specialize (multiples of 16, the value 1): the
    # kernel a GPU runs is then the one tests/test_triton_aot.py compiles (D, DR and the
    # strides are compiled as multiples of 16, the SPEC-shape case).
    @triton.jit(do_not_specialize=["N", "V", "tiles_per_split", "n_splits", "group"])
    def _fwd_kernel(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # inputs (see _tile_logits)
        part_ptr,  # (6, N, n_splits) fp32 partials: m, s, mr, sr, A, B per (row, split)
        z_out, zr_out,  # (N, V) fp32 logits kept for the gradient (STORE_LOGITS only): TMA
        # descriptors or pointers (see _store_tile)
        N, V, D, DR, stride_h, stride_hr, stride_w, stride_wr,
        stride_z,  # row stride of the kept logits (pointer path)
        inv_t,  # 1 / temperature
        tiles_per_split,  # vocabulary tiles owned by one program
        n_splits,  # splits per row block (grid = row blocks x n_splits programs)
        group,  # row blocks numbered together (launch order, _launch.py)
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
        STORE_LOGITS: tl.constexpr,  # also write every logit tile (gradients in the forward)
        TMA: tl.constexpr,  # z_out / zr_out are TMA descriptors
        FLATTEN: tl.constexpr,  # one pipelined (tile, D slice) loop (KernelConfig.flatten)
    ):  # fmt: skip
        pid_n, pid_s = _grouped_pid(tl.cdiv(N, BLOCK_N), n_splits, group)
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
        # FLATTEN: triton fuses this loop with _tile_logits' D loop into one pipelined loop
        # (the epilogue below runs on a tile's last slice, the next tile's copies in flight).
        for i in tl.range(0, tiles_per_split, flatten=FLATTEN):
            t = pid_s * tiles_per_split + i
            cols = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_ok = cols < V
            z, zr = _tile_logits(
                h_ptr, hr_ptr, w_ptr, wr_ptr, rows, cols, row_ok, col_ok,
                D, DR, stride_h, stride_hr, stride_w, stride_wr, inv_t,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
            )  # fmt: skip
            if STORE_LOGITS:
                ok = row_ok[:, None] & col_ok[None, :]
                r0, c0 = pid_n * BLOCK_N, t * BLOCK_V
                _store_tile(z_out, r0, c0, rows, cols, ok, stride_z, z, TMA)
                if HAS_REF:
                    _store_tile(zr_out, r0, c0, rows, cols, ok, stride_z, zr, TMA)
            if HAS_REF:
                # Columns past V are exactly 0 in both tiles (W loads fill 0), so both forms
                # are exact; which one compiles without spills is ptxas's call: the storing
                # 64 x 128 tile spills 16 B with the mask, the 128 x 128 one 8 B without it.
                if STORE_LOGITS:
                    diff = z - zr
                else:
                    diff = tl.where(col_ok[None, :], z - zr, 0.0)
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


def forward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    *, splits: int | None = None, config: KernelConfig | None = None,
    logits: tuple[Tensor, Tensor | None] | None = None,
) -> RowStats:  # fmt: skip
    """Per-row (lse, lser, fkl, rkl) fp32; ``splits``/``config`` override the choice (tests).
    ``logits`` = (z, zr): fp32 (N, V) row-major buffers that receive the logits (/ T); on sm_90
    and in the interpreter their rows must start 16-byte aligned (``common.logit_buffer``); one
    row stride for both."""
    h, hr, w, wr = prepare(h, hr, w, wr)
    n, d = h.shape
    v = w.shape[0]
    has_ref, shared = hr is not None, wr is None
    dr = hr.shape[1] if has_ref else d
    kind = "fwd" if logits is None else "fwd_store"
    if config is None:  # the shipped tiles, or with FGPO_TRITON_TUNE=1 the fastest (tune.py)
        name = gpu_config_name(kind, n, h.dtype, has_ref, shared=shared,
                               arch=device_arch(h.device))  # fmt: skip
        key = (str(h.device), h.dtype, has_ref, shared, tune.rows_bucket(n), d, dr, v)
        config = tune.config_for(
            name, named_config(name, n, max(d, dr)), h.device, key,
            lambda c: forward(h, hr, w, wr, temperature, splits=splits, config=c),
        )  # fmt: skip
    cfg = config
    plan = grid_plan(cfg, n, v, d, dr, has_ref, shared, h.dtype, h.device, splits=splits)
    s = plan.splits
    part = torch.empty((6 if has_ref else 2, n, s), dtype=torch.float32, device=h.device)
    hr_, wr_ = (hr if has_ref else h), (w if shared else wr)
    tma = logits is not None and tma_tiles(h.device)
    z_buf, zr_buf = logits if logits is not None else (part, part)
    zr_buf = z_buf if zr_buf is None else zr_buf
    if n:  # no rows: nothing to launch (the program numbering needs a row block)
        z_out, zr_out = (tile_arg(x, v, cfg.block_n, cfg.block_v, tma) for x in (z_buf, zr_buf))
        with on_device(h):
            _fwd_kernel[(plan.programs,)](
                h, hr_, w, wr_, part, z_out, zr_out,
                n, v, d, dr, h.stride(0), hr_.stride(0), w.stride(0), wr_.stride(0),
                z_buf.stride(0) if logits is not None else 0,  # unused without logits
                1.0 / temperature, plan.tiles_per_split, s, plan.group,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                HAS_REF=has_ref, SHARED=shared,
                PREC=DOT_PRECISION[h.dtype], PREC_R=DOT_PRECISION[hr_.dtype],
                STORE_LOGITS=logits is not None, TMA=tma, FLATTEN=cfg.flatten,
                **launch_opts(cfg),
            )  # fmt: skip
    if not has_ref:
        return RowStats(_merge(part[0], part[1]), None, None, None)
    # Every partial sum onto the row's overall maxima, then the one KL finish of every impl.
    top = part[0].amax(dim=1, keepdim=True)
    top_r = part[2].amax(dim=1, keepdim=True)
    scale, scale_r = torch.exp(part[0] - top), torch.exp(part[2] - top_r)
    return finish_kl(
        top[:, 0], (part[1] * scale).sum(1), (part[4] * scale).sum(1),
        top_r[:, 0], (part[3] * scale_r).sum(1), (part[5] * scale_r).sum(1),
    )  # fmt: skip


def _merge(m: Tensor, s: Tensor) -> Tensor:
    """log-sum-exp over splits of per-split (max, scaled sum)."""
    if m.shape[1] == 1:
        return m[:, 0] + torch.log(s[:, 0])
    top = m.amax(dim=1, keepdim=True)
    return top[:, 0] + torch.log((s * torch.exp(m - top)).sum(1))
