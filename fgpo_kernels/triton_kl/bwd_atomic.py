"""Triton backward, "atomic" mode: one program per (row block, vocabulary tile), fp32 atomics.

Math (the one-hot parts of the log-prob gradients are added by the caller):
    G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p          (d = log p - log r)
    Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r
    dh = G W / T,  dW = G^T h / T,  dhr = Gr Wr / T,  dWr = Gr^T hr / T.
Each program recomputes its logit tiles, forms G (and Gr) with ``_tile_grads``, then loops over D
in BLOCK_D chunks and adds its share into fp32 dh / dW (dhr / dWr) with ``tl.atomic_add`` (the
Cut Cross-Entropy scheme): nothing of size rows x V_block exists at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import Grads, Needs, RowGrads, RowStats
from .common import DOT_PRECISION, on_device, prepare, row_inputs, tl, triton
from .configs import KernelConfig, grid_plan, kernel_config, launch_opts

if triton is not None:
    from .common import _grouped_pid, _tile_grads, _tile_logits

    # Int arguments triton's launcher must not specialize (see fwd._fwd_kernel).
    @triton.jit(do_not_specialize=["N", "V", "group"])
    def _bwd_kernel(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # inputs (see _tile_logits)
        stats_ptr,  # (8, N) fp32: lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr
        dh_ptr, dhr_ptr, dw_ptr, dwr_ptr,  # fp32 contiguous gradient buffers (atomic adds)
        N, V, D, DR, stride_h, stride_hr, stride_w, stride_wr,
        inv_t,  # 1 / temperature
        group,  # row blocks that sweep the vocabulary together (L2 reuse, _launch.py)
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
        DO_DH: tl.constexpr, DO_DW: tl.constexpr,  # policy gradients wanted
        DO_DHR: tl.constexpr, DO_DWR: tl.constexpr,  # reference gradients wanted (DWR: separate)
    ):  # fmt: skip
        # Grouped order: ``group`` consecutive row blocks walk the vocabulary tiles together.
        pid_n, pid_v = _grouped_pid(tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), group)

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


def backward_atomic(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    stats: RowStats, grads: RowGrads, need: Needs, *, config: KernelConfig | None = None,
) -> Grads:  # fmt: skip
    h, hr, w, wr = prepare(h, hr, w, wr)
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
    if n == 0 or not (need_h or need_w or need_hr or need_wr):
        return Grads(dh, dhr, dw, dwr)
    per_row = row_inputs(n, dev, stats, grads)
    cfg = config or kernel_config("bwd", n, max(d, dr), h.dtype, has_ref, device=dev)
    hr_, wr_ = (hr if has_ref else h), (w if shared else wr)
    dummy = per_row  # stands in for the gradient buffers nobody asked for (never touched)
    plan = grid_plan(cfg, n, v, d, dr, has_ref, shared, h.dtype, dev, tiles_per_program=1)
    with on_device(h):
        _bwd_kernel[(plan.programs,)](
            h, hr_, w, wr_, per_row,
            dummy if dh is None else dh, dummy if dhr is None else dhr,
            dummy if dw is None else dw, dummy if dwr is None else dwr,
            n, v, d, dr, h.stride(0), hr_.stride(0), w.stride(0), wr_.stride(0),
            1.0 / temperature, plan.group,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            HAS_REF=has_ref, SHARED=shared,
            PREC=DOT_PRECISION[h.dtype], PREC_R=DOT_PRECISION[hr_.dtype],
            DO_DH=need_h, DO_DW=need_w, DO_DHR=need_hr, DO_DWR=need_wr,
            **launch_opts(cfg),
        )  # fmt: skip
    return Grads(dh, dhr, dw, dwr)
