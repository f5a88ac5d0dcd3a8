"""What every Triton kernel of this impl shares: the tile building blocks and the host helpers.

Jit helpers (row i, vocabulary column j of one tile, T = temperature):
    _tile_logits   z = h W^T / T and zr = hr Wr^T / T for a (BLOCK_N, BLOCK_V) tile, fp32
                   accumulation over BLOCK_D chunks of D (one load of each W chunk when shared;
                   both dots in one loop; W loads evict_first)
    _grouped_pid   (row block, column block) of a program in grouped (L2-friendly) order,
                   the order ``_launch.py`` sizes
    _tile_grads    G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p
                   Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r      (d = log p - log r)
                   from the saved per-row lse, lser, fkl, rkl and the incoming per-row gradients
    _store_tile / _load_tile   one (BLOCK_N, BLOCK_V) tile of a row-major buffer (kept logits,
                   G): through a TMA tensor descriptor (sm_90, the interpreter) or per-element
                   pointers (sm_80)
Host helpers: input checks (``prepare``), the per-row input block of the gradient kernels
(``row_inputs``), the device guard of a launch (``on_device``), the argument a tile buffer is
passed as (``tile_arg``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._backend import RowGrads, RowStats
from .._util import triton_interpret

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = tl = TensorDescriptor = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# tl.dot input precision per input dtype: exact IEEE fp32 dots (no TF32) for fp32 inputs;
# 16-bit inputs use tensor cores with fp32 accumulation either way.
DOT_PRECISION = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}

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
        """(z, zr) fp32 tiles (BLOCK_N, BLOCK_V), already divided by T; masked entries are 0.

        One loop over max(D, DR) feeds both dots (a separate reference weight too: one
        accumulator pair live at a time, which keeps 128 x 128 tiles free of register spills;
        when D != DR the shorter side's slices are masked to zero). W loads ``evict_first``: the
        row blocks of one group read a W slice at about the same time and never again, so L2
        keeps the hidden states instead (the L2 model of ``_launch.py``)."""
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        accr = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, tl.maximum(D, DR), BLOCK_D):
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
                eviction_policy="evict_first",
            )
            acc = tl.dot(x, wt, acc, input_precision=PREC)
            if HAS_REF:
                dkr_ok = dk < DR
                xr = tl.load(
                    hr_ptr + rows[:, None] * stride_hr + dk[None, :],
                    mask=row_ok[:, None] & dkr_ok[None, :],
                    other=0.0,
                )
                if SHARED:
                    accr = tl.dot(xr, wt, accr, input_precision=PREC_R)
                else:
                    wrt = tl.load(
                        wr_ptr + cols[None, :] * stride_wr + dk[:, None],
                        mask=dkr_ok[:, None] & col_ok[None, :],
                        other=0.0,
                        eviction_policy="evict_first",
                    )
                    accr = tl.dot(xr, wrt, accr, input_precision=PREC_R)
        return acc * inv_t, accr * inv_t

    @triton.jit
    def _grouped_pid(n_row_blocks, n_col_blocks, group):
        """(row block, column block or split) of this program in grouped order: ``group``
        consecutive row blocks walk the column blocks together, row block fastest, so one wave
        touches few H blocks and W tiles and both are reused from L2 (``_launch.py``)."""
        pid = tl.program_id(0)
        per_group = group * n_col_blocks
        first = (pid // per_group) * group
        group_size = tl.minimum(n_row_blocks - first, group)
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
    def _store_tile(
        dst,  # tensor descriptor (TMA) or pointer to a row-major buffer
        r0, c0,  # first row / column of the tile (in the descriptor's coordinates)
        rows, cols, ok,  # int64 rows and columns (pointer path), the (row, column) mask
        stride,  # row stride of the buffer in elements (pointer path)
        value,  # (BLOCK_N, BLOCK_V) tile, rounded to the buffer's dtype here
        TMA: tl.constexpr,
    ):  # fmt: skip
        """Store one tile. TMA: the tile goes registers -> shared memory -> global in one bulk
        copy, clipped to the descriptor's shape: no per-element addresses or masks in registers,
        which is what lets m64n128 tiles store two fp32 tiles without spilling on sm_90."""
        if TMA:
            dst.store([r0, c0], value.to(dst.dtype))
        else:
            at = dst + rows[:, None] * stride + cols[None, :]
            tl.store(at, value.to(dst.dtype.element_ty), mask=ok)

    @triton.jit
    def _load_tile(src, r0, c0, rows, cols, ok, stride, TMA: tl.constexpr):
        """Load one tile (zero outside the buffer / ``ok``); arguments as ``_store_tile``."""
        if TMA:
            return src.load([r0, c0])
        else:
            return tl.load(src + rows[:, None] * stride + cols[None, :], mask=ok, other=0.0)

    @triton.jit
    def _count_to(out_ptr, n):
        """Store n, counted by a loop with a runtime bound (``interpreter_loop_error``)."""
        count = tl.zeros((1,), tl.int32)
        for _ in tl.range(0, n):
            count += 1
        tl.store(out_ptr + tl.arange(0, 1), count)


def interpreter_loop_error() -> str | None:
    """Why this triton's CPU interpreter cannot run a loop with a runtime bound (every kernel
    here has one), or None when it can: triton 3.6's turns a scalar into an index with
    ``int(array)``, which numpy 2 refuses for 1-element arrays. Runs one tiny kernel; call it
    under TRITON_INTERPRET=1 only (on a GPU it would compile)."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](out, 3)
    except Exception as exc:  # the interpreter's own error, reported, never raised
        return f"{type(exc).__name__}: {exc}"
    return None if int(out) == 3 else f"a loop of 3 iterations counted {int(out)}"


def _check(h: Tensor, name: str) -> None:
    if h.dtype not in DOT_PRECISION:
        raise TypeError(f"impl 'triton' supports float32/bfloat16/float16 {name}, got {h.dtype}")
    if h.device.type != "cuda" and not triton_interpret():
        raise RuntimeError(
            f"impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {name} on {h.device}"
        )
    if h.stride(-1) != 1:
        raise ValueError(f"impl 'triton' needs {name} with unit stride in the last dimension")


def prepare(h, hr, w, wr):
    """Contiguous inputs, each checked (dtype, device, unit last stride)."""
    h, w = h.contiguous(), w.contiguous()
    hr = None if hr is None else hr.contiguous()
    wr = None if wr is None else wr.contiguous()
    for x, name in ((h, "h"), (hr, "hr"), (w, "w"), (wr, "wr")):
        if x is not None:
            _check(x, name)
    return h, hr, w, wr


def on_device(x: Tensor):
    """Launch on the tensors' GPU, not whichever one is current."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def tile_arg(buf: Tensor, cols: int, block_n: int, block_v: int, tma: bool):
    """A row-major (rows, >= cols) buffer as a kernel argument: a TMA descriptor of its first
    ``cols`` columns with (``block_n``, ``block_v``) boxes, or the tensor itself (pointer path).
    TMA needs a 16-byte aligned base and row stride (``logit_buffer`` pads fp32 rows to 16)."""
    if not tma:
        return buf
    if buf.stride(1) != 1 or (buf.stride(0) * buf.element_size()) % 16 or buf.data_ptr() % 16:
        raise ValueError(
            f"impl 'triton': a TMA tile buffer needs unit column stride and a 16-byte aligned "
            f"base and row stride, got shape {tuple(buf.shape)} stride {buf.stride()} "
            f"({buf.dtype})"
        )
    return TensorDescriptor(buf, [buf.shape[0], cols], [buf.stride(0), 1], [block_n, block_v])


def logit_stride(v: int) -> int:
    """Row stride of a kept-logit buffer: v rounded up to 16 elements, so rows start 16-byte
    aligned, as TMA needs, and the stride is the multiple of 16 the kernels are compiled for
    (tests/test_triton_aot.py)."""
    return -(-v // 16) * 16


def logit_buffer(n: int, v: int, device) -> Tensor:
    """An fp32 (n, v) buffer for kept logits with row stride ``logit_stride(v)``."""
    return torch.empty((n, logit_stride(v)), dtype=torch.float32, device=device)[:, :v]


def row_inputs(n: int, dev, stats: RowStats, grads: RowGrads) -> Tensor:
    """(8, N) fp32 per-row inputs of the gradient kernels (None = zero): lse, lser, fkl, rkl,
    g_fkl, g_rkl, g_lp, g_lpr."""
    zero = torch.zeros(n, dtype=torch.float32, device=dev)
    return torch.stack([zero if x is None else x.to(torch.float32) for x in (*stats, *grads)])
