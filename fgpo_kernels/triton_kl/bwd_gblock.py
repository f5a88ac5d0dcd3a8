"""Triton backward, "gblock" mode (the default): G chunks in a Triton kernel, then library GEMMs.

Math (the one-hot parts of the log-prob gradients are added by the caller):
    G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p          (d = log p - log r)
    Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r
    dh = G W / T,  dW = G^T h / T,  dhr = Gr Wr / T,  dWr = Gr^T hr / T.
For each vocabulary chunk [v0, v0 + Vc): ``_g_kernel`` writes G / T (and Gr / T) for all rows
into a (rows x Vc) buffer in the input dtype, then torch GEMMs (cuBLAS on a GPU) do
dh += G W_c and dW_c = G^T h, written once per chunk (no atomics, deterministic). Shared weight:
G rows sit on top of Gr rows, so dh and dhr are one GEMM and the shared dW_c one GEMM with K = 2N.
Vc comes from ``configs.chunk_columns``: the buffer is rows x V_block, never rows x V. A chunk's
G launches come from ``configs.g_launches``: on sm_90, G and Gr from recomputed logits run on
"g_both" tiles over a multiple of 16 columns and a ragged tail (< 16) on "g_narrow" tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import Grads, Needs, RowGrads, RowStats
from . import tune
from .common import DOT_PRECISION, on_device, prepare, row_inputs, tile_arg, tl, triton
from .configs import (
    G_ALIGN,
    G_ALIGNED,
    KernelConfig,
    chunk_columns,
    device_arch,
    g_launches,
    g_tiles_per_program,
    gblock_elems,
    gpu_config_name,
    grid_plan,
    launch_opts,
    named_config,
    tma_tiles,
)

if triton is not None:
    from .common import _grouped_pid, _load_tile, _store_tile, _tile_grads, _tile_logits

    @triton.jit
    def _g_tile(
        h_ptr, hr_ptr, w_ptr, wr_ptr, stats_ptr, g_out, gr_out, z_in, zr_in,
        rows, row_ok, r0, t,  # this program's rows (int64), their mask, first row; tile index
        N, D, DR, stride_h, stride_hr, stride_w, stride_wr, stride_g, stride_gr, stride_z,
        inv_t, v0, chunk_v,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
        DO_G: tl.constexpr, DO_GR: tl.constexpr, FROM_LOGITS: tl.constexpr, TMA: tl.constexpr,
    ):  # fmt: skip
        """G / T (and Gr / T) of vocabulary tile ``t`` of the launch, stored (see _g_body)."""
        local = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        cols = v0 + local
        col_ok = local < chunk_v
        ok = row_ok[:, None] & col_ok[None, :]
        c0 = t * BLOCK_V
        if FROM_LOGITS:
            z = _load_tile(z_in, r0, v0 + c0, rows, cols, ok, stride_z, TMA)
            zr = _load_tile(zr_in, r0, v0 + c0, rows, cols, ok, stride_z, TMA) if HAS_REF else z
        else:
            z, zr = _tile_logits(
                h_ptr, hr_ptr, w_ptr, wr_ptr, rows, cols, row_ok, col_ok,
                D, DR, stride_h, stride_hr, stride_w, stride_wr, inv_t,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
            )  # fmt: skip
        g, gr = _tile_grads(z, zr, stats_ptr, rows, row_ok, ok, N, HAS_REF)
        if DO_G:
            _store_tile(g_out, r0, c0, rows, local, ok, stride_g, g * inv_t, TMA)
        if DO_GR:
            _store_tile(gr_out, r0, c0, rows, local, ok, stride_gr, gr * inv_t, TMA)

    # The body of the two G kernels below (they differ in what triton may specialize).
    def _g_body(
        h_ptr, hr_ptr, w_ptr, wr_ptr,  # inputs (see _tile_logits)
        stats_ptr,  # (8, N) fp32: lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr
        g_out, gr_out,  # (N, >= chunk_v) buffers in the input dtypes: G / T and Gr / T
        z_in, zr_in,  # (N, V) fp32 logits kept by the forward (FROM_LOGITS only)
        # (g_out, gr_out, z_in, zr_in: TMA descriptors or pointers, see _store_tile)
        N, V, D, DR, stride_h, stride_hr, stride_w, stride_wr, stride_g, stride_gr, stride_z,
        inv_t,  # 1 / temperature
        v0,  # first vocabulary column of this launch
        chunk_v,  # columns of this launch (v0 + chunk_v <= V)
        group,  # row blocks that sweep the chunk's tiles together (L2 reuse, _launch.py)
        tiles_per_split,  # FLATTEN: tiles one program loops over (else 1)
        n_splits,  # column blocks of the grouped order: splits (FLATTEN) or tiles
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_REF: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, PREC_R: tl.constexpr,
        DO_G: tl.constexpr, DO_GR: tl.constexpr,  # which gradient tiles to write
        FROM_LOGITS: tl.constexpr,  # read the kept logits instead of recomputing them
        TMA: tl.constexpr,  # the four tile buffers are TMA descriptors
        FLATTEN: tl.constexpr,  # a loop over tiles_per_split tiles, pipelined as one with D's
    ):  # fmt: skip
        """gblock backward, step 1: the logit-gradient tiles of one vocabulary chunk, written to
        a (rows x chunk) buffer for the library GEMMs (already divided by T). One tile per
        program, or with FLATTEN ``tiles_per_split`` consecutive tiles in one software-pipelined
        loop with the D loop (KernelConfig.flatten: the next tile's copies fly during a tile's
        epilogue and store; a split's tiles past the chunk are masked and write nothing)."""
        pid_n, pid_s = _grouped_pid(tl.cdiv(N, BLOCK_N), n_splits, group)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        r0 = pid_n * BLOCK_N
        if FLATTEN:
            for i in tl.range(0, tiles_per_split, flatten=True):
                _g_tile(
                    h_ptr, hr_ptr, w_ptr, wr_ptr, stats_ptr, g_out, gr_out, z_in, zr_in,
                    rows, row_ok, r0, pid_s * tiles_per_split + i,
                    N, D, DR, stride_h, stride_hr, stride_w, stride_wr, stride_g, stride_gr,
                    stride_z, inv_t, v0, chunk_v,
                    BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
                    DO_G, DO_GR, FROM_LOGITS, TMA,
                )  # fmt: skip
        else:
            _g_tile(
                h_ptr, hr_ptr, w_ptr, wr_ptr, stats_ptr, g_out, gr_out, z_in, zr_in,
                rows, row_ok, r0, pid_s,
                N, D, DR, stride_h, stride_hr, stride_w, stride_wr, stride_g, stride_gr,
                stride_z, inv_t, v0, chunk_v,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF, SHARED, PREC, PREC_R,
                DO_G, DO_GR, FROM_LOGITS, TMA,
            )  # fmt: skip

    # The int arguments triton would specialize at a launch (multiples of 16, the value 1) are
    # fixed here, so that the kernel a GPU runs is the one tests/test_triton_aot.py compiles
    # (it checks that every int argument is either compiled as aligned or listed below). N, V
    # and group take any value and are never specialized (at N % 16 == 0, as at N = 8192, the
    # specialized "g_both" kernel spilled 16 B: AOT, triton 3.7.1), nor are the split counts;
    # v0 is always a multiple of 16 (configs.g_launches); chunk_v is one too for the entries in
    # G_ALIGNED, which launch ``_g_kernel_aligned`` (their tiles spill otherwise), and any width
    # for the rest (a ragged tail, kept logits), which launch ``_g_kernel``.
    _PLAIN = ["N", "V", "group", "tiles_per_split", "n_splits"]
    _g_kernel = triton.jit(do_not_specialize=[*_PLAIN, "chunk_v"])(_g_body)
    _g_kernel_aligned = triton.jit(do_not_specialize=_PLAIN)(_g_body)


# ---------------------------------------------------------------------------------- host side

_OUT_DTYPE_GEMM: dict = {}  # (device, dtype) -> whether cuBLAS can accumulate fp32 in place


def _fp32_out_gemm(a: Tensor) -> bool:
    """16-bit CUDA operands and a torch whose cuBLAS GEMMs write fp32 (``out_dtype``) and add
    into the output in place (``addmm(acc, a, b, out=acc)``), checked once per device."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return False
    key = (str(a.device), a.dtype)
    if key not in _OUT_DTYPE_GEMM:
        try:
            x = torch.ones((2, 2), dtype=a.dtype, device=a.device)
            out = torch.empty((2, 2), dtype=torch.float32, device=a.device)
            torch.mm(x, x, out_dtype=torch.float32, out=out)
            res = torch.addmm(out, x, x, out_dtype=torch.float32, out=out)
            _OUT_DTYPE_GEMM[key] = bool((res == 4).all()) and res.data_ptr() == out.data_ptr()
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
    """An fp32 (rows, D) accumulator over vocabulary chunks: acc += a @ b, in place.

    fp32 operands: ``addmm_``. 16-bit CUDA operands: cuBLAS reads the sum and writes it back
    in fp32 (``addmm(acc, a, b, out_dtype=float32, out=acc)``: beta = 1 on the same buffer; an
    ``out`` other than ``acc`` would make PyTorch copy the sum there first, one extra pass over
    it per chunk). Otherwise (CPU, or a torch without ``out_dtype``): the chunk's product is
    rounded to the input dtype, then added in fp32."""

    def __init__(self, rows: int, cols: int, device) -> None:
        self.sum = torch.zeros((rows, cols), dtype=torch.float32, device=device)

    def add(self, a: Tensor, b: Tensor) -> None:
        if a.dtype == torch.float32:
            self.sum.addmm_(a, b)
        elif _fp32_out_gemm(a):
            torch.addmm(self.sum, a, b, out_dtype=torch.float32, out=self.sum)
        else:
            self.sum.add_(torch.mm(_dense_on_cpu(a), b))


def backward_gblock(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    stats: RowStats, grads: RowGrads, need: Needs,
    *, config: KernelConfig | None = None, chunk_elems: int | None = None,
    logits: tuple[Tensor, Tensor | None] | None = None,
) -> Grads:  # fmt: skip
    """Per vocabulary chunk: a Triton kernel writes G / T (and Gr / T) for all rows in the input
    dtype, then library GEMMs do dh += G W_c, dW_c = G^T h (written once, no atomics).
    ``logits`` = (z, zr) kept by ``forward`` (row-major fp32, ``common.logit_buffer``): G from
    them instead of recomputing the logit tiles. ``chunk_elems``: the buffer budget
    (``configs.gblock_elems``: env, else a share of the GPU's free memory)."""
    h, hr, w, wr = prepare(h, hr, w, wr)
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
    per_row = row_inputs(n, dev, stats, grads)
    # The entry of the chunk (its tiles size the chunk); each chunk runs the launches
    # ``g_launches`` gives it ("g_both": a 16-aligned main part and a narrow ragged tail).
    # ``config`` replaces the tiles of every launch, not the split.
    name = gpu_config_name("g", n, h.dtype, has_ref, shared=shared, both=do_g and do_gr,
                           held=logits is not None, arch=device_arch(dev))  # fmt: skip
    if config is None:  # the shipped tiles, or with FGPO_TRITON_TUNE=1 the fastest (tune.py)
        key = (str(dev), h.dtype, has_ref, shared, need_h, need_hr, need_w, need_wr,
               logits is not None, tune.rows_bucket(n), d, dr, v)  # fmt: skip
        cfg = tune.config_for(
            name, named_config(name, n, max(d, dr)), dev, key,
            lambda c: backward_gblock(h, hr, w, wr, temperature, stats, grads, need, config=c,
                                      chunk_elems=chunk_elems, logits=logits),
        )  # fmt: skip
    else:
        cfg = config
    hr_, wr_ = (hr if has_ref else h), (w if shared else wr)
    budget = gblock_elems(chunk_elems, dev, h.element_size())

    # Gradient buffers. Shared weight: one buffer, G rows on top of Gr rows, so the shared dW is
    # ONE GEMM over 2N rows (against [h; hr]) and dh, dhr one GEMM against the W chunk.
    g_rows = n if do_g else 0
    gr_rows = n if do_gr else 0
    vc = chunk_columns(g_rows + gr_rows, v, cfg.block_v, budget)
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

    tma = tma_tiles(dev)
    z_buf, zr_buf = logits if logits is not None else (per_row, per_row)
    zr_buf = z_buf if zr_buf is None else zr_buf
    with on_device(h):
        for v0 in range(0, v, vc):
            vl = min(vc, v - v0)
            for off, width, part in g_launches(name, vl):
                pcfg = cfg if part == name else config or named_config(part, n, max(d, dr))
                plan = grid_plan(pcfg, n, width, d, dr, has_ref, shared, h.dtype, dev,
                                 tiles_per_program=g_tiles_per_program(pcfg))  # fmt: skip
                # Buffer columns [off, off + width): a tail's view keeps a 16-byte aligned
                # base for TMA (off is a multiple of 16 elements).
                g_out, gr_out = (tile_arg(x[:, off:], width, pcfg.block_n, pcfg.block_v, tma)
                                 for x in (g_arg, gr_arg))  # fmt: skip
                z_in, zr_in = ((tile_arg(x, v, pcfg.block_n, pcfg.block_v, tma)
                                for x in (z_buf, zr_buf))
                               if logits is not None else (z_buf, zr_buf))  # fmt: skip
                aligned = part in G_ALIGNED
                if aligned and (width % G_ALIGN or (v0 + off) % G_ALIGN):
                    raise RuntimeError(f"g_launches gave {part} columns [{v0 + off}, +{width})")
                (_g_kernel_aligned if aligned else _g_kernel)[(plan.programs,)](
                    h, hr_, w, wr_, per_row, g_out, gr_out, z_in, zr_in,
                    n, v, d, dr, h.stride(0), hr_.stride(0), w.stride(0), wr_.stride(0),
                    g_arg.stride(0), gr_arg.stride(0),
                    z_buf.stride(0) if logits is not None else 0,  # unused without logits
                    1.0 / temperature, v0 + off, width, plan.group,
                    plan.tiles_per_split, plan.splits,
                    BLOCK_N=pcfg.block_n, BLOCK_V=pcfg.block_v, BLOCK_D=pcfg.block_d,
                    HAS_REF=has_ref, SHARED=shared,
                    PREC=DOT_PRECISION[h.dtype], PREC_R=DOT_PRECISION[hr_.dtype],
                    DO_G=do_g, DO_GR=do_gr, FROM_LOGITS=logits is not None, TMA=tma,
                    FLATTEN=pcfg.flatten,
                    **launch_opts(pcfg),
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
