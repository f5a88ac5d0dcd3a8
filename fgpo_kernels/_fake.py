"""Fake (meta) host entry points of impls "triton" and "cuda", for memory simulation.

A memory simulation (``benchmarks/memory_model.py``) runs a whole training step on meta
tensors: shapes and allocations, no data, no GPU. A kernel cannot run there, but the memory a
fused op holds on a GPU is its host code's: the outputs and the workspaces it allocates around
the launches. These fakes implement the backend contract (``_backend.py``) on meta tensors by
allocating exactly those tensors, sized by the SAME functions the real host code calls
(``triton_kl.configs``: tile table, launch plan, backward mode, gblock chunk width;
``cuda_kl._plan`` and ``cuda_kl._pad8``), so a tracker sees the impl's real workspace:

- triton forward: the (6 or 2, N, splits) fp32 split partials and their log-sum-exp merge
  (``fwd._merge``);
- triton backward, gblock: dW (and dWr) in fp32, the (8, N) per-row inputs
  (``common.row_inputs``), the rows x chunk gradient buffer(s) in the input dtype, the fp32
  accumulators of dh/dhr (summed in place), and [h; hr] for the shared dW; atomic: the fp32
  gradient buffers;
- cuda: the zero-padded copies when D is not a multiple of 8, the splits x (6 or 2) x N fp32
  partials; its backward is triton's gblock (the default) or, with FGPO_CUDA_BWD=cuda, the fp32
  gradient buffers and their trimmed copies.

``simulate_gpu(name, sm_count)`` is the switch: while it is active, meta tensors stand for that
GPU (``_util.sm_count`` answers its SM count, ``_registry`` treats "triton" and "cuda" as usable
on meta tensors and hands out these fakes, and ``TRITON_INTERPRET`` is set aside so the GPU's
tile table and split count are used).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from . import _util
from ._backend import Grads, Needs, RowGrads, RowStats

# The device the sizing functions are asked about: the simulated GPU.
SIM_DEVICE = torch.device("cuda", 0)
_F32 = torch.float32


@contextlib.contextmanager
def simulate_gpu(name: str = "H100", sm_count: int = 132) -> Iterator[dict]:
    """Meta tensors stand for GPU ``name`` with ``sm_count`` SMs inside this context."""
    if sm_count < 1:
        raise ValueError(f"sm_count must be >= 1, got {sm_count}")
    old_gpu, old_interp = _util._SIMULATED_GPU, os.environ.pop("TRITON_INTERPRET", None)
    _util._SIMULATED_GPU = {"name": str(name), "sm_count": int(sm_count)}
    try:
        yield _util._SIMULATED_GPU
    finally:
        _util._SIMULATED_GPU = old_gpu
        if old_interp is not None:
            os.environ["TRITON_INTERPRET"] = old_interp


def usable(name: str) -> tuple[bool, str]:
    """Whether impl ``name``'s host code (its sizing functions) can be simulated here."""
    if name == "triton":
        from .triton_kl.common import IMPORT_ERROR, triton

        return (True, "") if triton is not None else (False, f"triton: {IMPORT_ERROR}")
    if name == "cuda":
        from . import cuda_kl

        if cuda_kl._ext() is None:  # its block sizes (hence the split count) live in _C
            return False, f"fgpo_kernels._C is not importable ({cuda_kl._IMPORT_ERROR})"
        return True, ""
    return False, f"no fake host code for impl {name!r}"


def backend(name: str):
    """The fake backend of impl ``name`` ("triton" or "cuda")."""
    ok, why = usable(name)
    if not ok:
        raise RuntimeError(f"impl {name!r} cannot be simulated: {why}")
    return {"triton": TritonFake, "cuda": CudaFake}[name]()


def _check(h: Tensor) -> None:
    if h.device.type != "meta":
        raise RuntimeError(
            f"a GPU is being simulated (fgpo_kernels._fake.simulate_gpu) but the tensors are "
            f"on {h.device}: the fake impls compute nothing, they only allocate"
        )


def _zeros_or_none(shape, need: bool, like: Tensor) -> Tensor | None:
    return torch.zeros(shape, dtype=_F32, device=like.device) if need else None


def _zero_grads(h: Tensor, hr: Tensor | None, w: Tensor, need: Needs) -> Grads:
    """fp32 zero-filled gradient buffers of the needed inputs (the atomic kernels add into
    them; gblock returns them when no row needs work)."""
    n, d, v = h.shape[0], h.shape[1], w.shape[0]
    dr = hr.shape[1] if hr is not None else d
    shapes = ((n, d), (n, dr), (v, d), (v, dr))
    return Grads(*(_zeros_or_none(s, wanted, h) for s, wanted in zip(shapes, need)))


class TritonFake:
    """impl "triton" on meta tensors: ``triton_kl``'s host allocations, no launches."""

    def probe(self) -> dict:
        return {"available": True, "built": True, "reason": "simulated (meta tensors)"}

    def forward(self, h, hr, w, wr, temperature) -> RowStats:
        from .triton_kl import configs, fwd

        _check(h)
        n, d = h.shape
        v, has_ref = w.shape[0], hr is not None
        dr = hr.shape[1] if has_ref else d
        shared = wr is None
        cfg = configs.kernel_config(
            "fwd", n, max(d, dr), h.dtype, has_ref, shared=shared, device=SIM_DEVICE
        )
        s = configs.grid_plan(cfg, n, v, d, dr, has_ref, shared, h.dtype, SIM_DEVICE).splits
        part = torch.empty((6 if has_ref else 2, n, s), dtype=_F32, device=h.device)
        lse = fwd._merge(part[0], part[1])
        if not has_ref:
            return RowStats(lse, None, None, None)
        # The A/B merge has the same (n, splits) temporaries as _merge.
        return RowStats(
            lse, fwd._merge(part[2], part[3]), fwd._merge(part[5], part[3]),
            fwd._merge(part[4], part[1]),
        )  # fmt: skip

    def backward(self, h, hr, w, wr, temperature, stats, grads, need, *, chunk_elems=None):
        from .triton_kl import configs

        _check(h)
        args = (h, hr, w, wr, RowStats(*stats), RowGrads(*grads), Needs(*need))
        if configs.bwd_mode() == "atomic":
            return self._atomic(*args)
        return self._gblock(*args, configs.gblock_elems(chunk_elems))

    def _atomic(self, h, hr, w, wr, stats, grads, need) -> Grads:
        from .triton_kl.common import row_inputs

        need = need.possible(hr, wr)
        out = _zero_grads(h, hr, w, need)
        if any(need):
            row_inputs(h.shape[0], h.device, stats, grads)
        return out

    def _gblock(self, h, hr, w, wr, stats, grads, need, budget: int) -> Grads:
        from .triton_kl import configs
        from .triton_kl.common import row_inputs

        n, d = h.shape
        v, has_ref, shared = w.shape[0], hr is not None, wr is None
        dr = hr.shape[1] if has_ref else d
        need_h, need_hr, need_w, need_wr = need.possible(hr, wr)
        do_g = need_h or need_w
        do_gr = has_ref and (need_hr or need_wr or (shared and need_w))
        if n == 0 or not (do_g or do_gr):
            return _zero_grads(h, hr, w, Needs(need_h, need_hr, need_w, need_wr))
        dev = h.device
        dw = torch.empty((v, d), dtype=_F32, device=dev) if need_w else None
        dwr = torch.empty((v, dr), dtype=_F32, device=dev) if need_wr else None
        keep = [row_inputs(n, dev, stats, grads)]
        cfg = configs.kernel_config("g", n, max(d, dr), h.dtype, has_ref, shared=shared,
                                    both=do_g and do_gr, device=SIM_DEVICE)  # fmt: skip
        g_rows, gr_rows = (n if do_g else 0), (n if do_gr else 0)
        vc = configs.chunk_columns(g_rows + gr_rows, v, cfg.block_v, budget)
        if shared:
            keep.append(torch.empty((g_rows + gr_rows, vc), dtype=h.dtype, device=dev))
        else:
            keep.append(torch.empty((g_rows, vc), dtype=h.dtype, device=dev))
            keep.append(torch.empty((gr_rows, vc), dtype=hr.dtype, device=dev))

        def acc(rows: int, cols: int) -> Tensor:
            # _Acc: the fp32 sum, accumulated in place (cuBLAS out_dtype=float32 on a GPU).
            return torch.zeros((rows, cols), dtype=_F32, device=dev)

        dh = dhr = None
        if shared and need_h and need_hr:  # stacked: [G; Gr] @ W_c in one GEMM
            both = acc(2 * n, d)
            dh, dhr = both[:n], both[n:]
        else:
            dh = acc(n, d) if need_h else None
            dhr = acc(n, dr) if need_hr else None
        if shared and need_w and has_ref:
            keep.append(torch.cat([h, hr]))
        keep.clear()  # the workspaces end with the call
        return Grads(dh, dhr, dw, dwr)


class CudaFake:
    """impl "cuda" on meta tensors: ``cuda_kl``'s host allocations around the launches."""

    def probe(self) -> dict:
        return {"available": True, "built": True, "reason": "simulated (meta tensors)"}

    def forward(self, h, hr, w, wr, temperature) -> RowStats:
        from . import cuda_kl

        _check(h)
        if not cuda_kl.supports(h.dtype):  # delegated to triton, as on a GPU
            return TritonFake().forward(h, hr, w, wr, temperature)
        n, v, kl = h.shape[0], w.shape[0], hr is not None
        lse = torch.empty(n, dtype=_F32, device=h.device)
        lser, fkl, rkl = (torch.empty(n if kl else 0, dtype=_F32, device=h.device) for _ in "abc")
        if n:
            padded = [cuda_kl._pad8(x) for x in (h, hr, w, wr)]
            dr = hr.shape[1] if kl else 0
            name = (_util.simulated_gpu() or {}).get("name", "")
            hopper = any(g in name.upper() for g in ("H100", "H200", "H800", "H20"))
            wgmma = cuda_kl.forward_path(SIM_DEVICE, cap=(9, 0) if hopper else (8, 0)) == "wgmma"
            s = cuda_kl._plan(n, v, h.shape[1], dr, kl, SIM_DEVICE, wgmma=wgmma).splits
            torch.empty(s * (6 if kl else 2) * n, dtype=_F32, device=h.device)
            del padded
        return RowStats(lse, lser, fkl, rkl) if kl else RowStats(lse, None, None, None)

    def backward(self, h, hr, w, wr, temperature, stats, grads, need) -> Grads:
        from . import cuda_kl

        _check(h)
        if not cuda_kl.supports(h.dtype):
            return TritonFake().backward(h, hr, w, wr, temperature, stats, grads, need)
        if cuda_kl.bwd_choice() == "triton":  # the default: impl "triton"'s gblock backward
            args = (h, hr, w, wr, RowStats(*stats), RowGrads(*grads), Needs(*need))
            from .triton_kl import configs

            return TritonFake()._gblock(*args, configs.gblock_elems(None))
        need = Needs(*need).possible(hr, wr)
        hp, hrp, wp, wrp = (cuda_kl._pad8(x) for x in (h, hr, w, wr))
        n, v = h.shape[0], w.shape[0]
        bufs = [
            _zeros_or_none((n, hp.shape[1]), need.h, h),
            _zeros_or_none((n, hrp.shape[1]), need.hr, h) if hrp is not None else None,
            _zeros_or_none((v, wp.shape[1]), need.w, h),
            _zeros_or_none((v, wrp.shape[1]), need.wr, h) if wrp is not None else None,
        ]
        cols = (h.shape[1], hr.shape[1] if hr is not None else 0, w.shape[1],
                wr.shape[1] if wr is not None else 0)  # fmt: skip
        # As _bwd_impl: a buffer wider than its input (padding) is trimmed by a copy.
        out = [
            None if x is None else (x if x.shape[1] == c else x[:, :c].contiguous())
            for x, c in zip(bufs, cols)
        ]
        return Grads(*(g if wanted else None for g, wanted in zip(out, need)))
