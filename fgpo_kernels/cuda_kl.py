"""impl "cuda": the compiled kernels of ``fgpo_kernels._C`` (csrc/), contract in ``_backend.py``.

Math (row i, T = temperature; p = softmax z, r = softmax zr, d = log p - log r):
    z = h W^T / T, zr = hr Wr^T / T; online per vocabulary tile: m, s = sum e^(z-m),
    a = sum e^(z-m)(z-zr) (and mr, sr, b for the reference), merged across vocabulary splits;
    lse = m + log s, rkl = a/s - lse + lser, fkl = b/sr - lser + lse.
    G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p
    Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r
    dh = G W / T, dW = G^T h / T (and the reference side), fp32 atomics into fp32 buffers.

The kernels (csrc/kernels.cuh) take bf16/fp16 rows and weights: tensor-core tiles with fp32
accumulation (mma.sync; the forward on H100/H200 uses wgmma, csrc/fwd_wgmma.cuh, see
``forward_path``), online log-sum-exp, no rows x V tensor. Other dtypes (fp32, and fp64 used by
exact checks) are handed to impl "triton" (GPU) or "torch": the CUDA kernels have no fp32 path.
D that is not a multiple of 8 (or a misaligned view) is zero-padded on the fly (a copy of W).

Backward: by default impl "cuda" hands its backward to impl "triton"'s gblock backward (G chunks
+ cuBLAS GEMMs; docs/design.md §3.4): the CUDA backward kernel sweeps the vocabulary fastest
and reduces into the whole fp32 dW once per row block, which a GPU run has yet to time against
gblock. ``FGPO_CUDA_BWD=cuda`` (or ``backward(..., bwd="cuda")``) runs the CUDA kernel, and only
then: without a usable Triton the default backward is impl "torch"'s chunked one (library GEMMs,
as gblock), and ``probe()`` says which backward is in use.

The two entry points are ``torch.library`` custom ops (``fgpo::cuda_token_stats_fwd`` /
``_bwd``, flat tensor arguments: the typed contract is unpacked at that boundary only) with fake
implementations, so ``torch.compile`` traces through ``token_kl`` without
graph breaks; autograd lives in ``token_kl._TokenStats``. ``fgpo_kernels._C`` is imported
lazily (first ``probe()`` or call), never at package import. On first use on a GPU a small
self-test against impl "torch" runs once; a failure makes the impl unavailable with the reason.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from . import _launch, _selftest
from ._backend import Grads, Needs, RowGrads, RowStats
from ._util import no_cuda_reason

_HALF = (torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}
_C = None
_IMPORT_ERROR: str | None = None
_PROBE: dict | None = None
_SELFTEST_RUNNING = False
# The backward that impl "cuda" runs (env FGPO_CUDA_BWD): "triton" = impl "triton"'s gblock
# backward, or impl "torch"'s where Triton is unusable (the default until a GPU run has timed
# every backward path), "cuda" = the CUDA kernel.
BWD_CHOICES = ("triton", "cuda")


def bwd_choice(bwd: str | None = None) -> str:
    """``bwd`` if given, else env FGPO_CUDA_BWD, else "triton" (an unknown name is an error
    naming where it came from)."""
    chosen = bwd if bwd is not None else (os.environ.get("FGPO_CUDA_BWD") or "triton")
    if chosen not in BWD_CHOICES:
        src = "bwd" if bwd is not None else "FGPO_CUDA_BWD"
        raise ValueError(f"impl 'cuda': {src} must be one of {BWD_CHOICES}, got {chosen!r}")
    return chosen


def _triton_backward():
    """impl "triton"'s module when it can take the backward (a GPU, triton importable), else
    None (then the CUDA kernel runs)."""
    from . import _registry

    if _registry.status("triton")["available"]:
        return _registry.module("triton")
    return None


def _bwd_note() -> str:
    """Which backward impl "cuda" runs now, for ``probe()``'s reason."""
    try:
        choice = bwd_choice()
    except ValueError as exc:
        return f"backward: {exc}"
    if choice == "cuda":
        return "backward: the CUDA kernel (FGPO_CUDA_BWD=cuda)"
    if _triton_backward() is None:
        return ("backward: impl 'torch' chunked (impl 'triton' is unavailable for the default "
                "gblock; FGPO_CUDA_BWD=cuda for the CUDA kernel)")  # fmt: skip
    return "backward: impl 'triton' gblock (FGPO_CUDA_BWD=cuda for the CUDA kernel)"


# The forward kernel (env FGPO_CUDA_FWD): "auto" = "wgmma" (csrc/fwd_wgmma.cuh, Hopper's
# warpgroup MMA) where the extension has an sm_90a build and the GPU is compute capability 9.0,
# else "mma" (mma.sync, every sm_80+ GPU); "mma" / "wgmma" force one ("wgmma" where it cannot
# run is an error). A wgmma path that fails the first-use self-test is dropped for "mma".
FWD_CHOICES = ("auto", "mma", "wgmma")
_WGMMA_FAILED: str | None = None


def fwd_choice() -> str:
    """Env FGPO_CUDA_FWD, else "auto" (an unknown name is an error naming the variable)."""
    choice = os.environ.get("FGPO_CUDA_FWD") or "auto"
    if choice not in FWD_CHOICES:
        raise ValueError(f"impl 'cuda': FGPO_CUDA_FWD must be one of {FWD_CHOICES}, got {choice!r}")
    return choice


def forward_path(
    device: torch.device | None = None, cap: tuple[int, int] | None = None
) -> str:  # fmt: skip
    """The forward kernel a launch on ``device`` runs: "wgmma" or "mma" (FWD_CHOICES above).
    ``device`` None: the current GPU. Off a GPU (the CPU emulation in tests) "auto" is "mma".
    ``cap``: the compute capability of a simulated GPU (``_fake``) instead of asking CUDA."""
    choice = fwd_choice()
    if choice == "mma":
        return "mma"
    ext = _ext()
    built = bool(getattr(ext, "WGMMA", False))
    on_gpu = device is None or device.type == "cuda"
    if cap is None and on_gpu and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(device)
    hopper = on_gpu and cap == (9, 0)
    if choice == "auto":
        return "wgmma" if built and hopper and _WGMMA_FAILED is None else "mma"
    if not built:
        archs = getattr(ext, "ARCHS", "?")
        raise RuntimeError(
            f"impl 'cuda': FGPO_CUDA_FWD=wgmma, but fgpo_kernels._C was built for sm_{archs} "
            "without an sm_90a target (rebuild with FGPO_CUDA_ARCHS='80;90a')"
        )
    if on_gpu and not hopper:
        raise RuntimeError("impl 'cuda': FGPO_CUDA_FWD=wgmma needs a compute capability 9.0 GPU "
                           "(H100/H200); wgmma is specific to sm_90a")  # fmt: skip
    return "wgmma"


def _fwd_note(device: torch.device | None = None) -> str:
    """Which forward kernel impl "cuda" runs now, for ``probe()``'s reason."""
    try:
        path = forward_path(device)
    except (ValueError, RuntimeError) as exc:
        return f"forward: {exc}"
    if path == "wgmma":
        return "forward: wgmma m64n128k16 (sm_90a)"
    why = f"; the wgmma forward failed its self-test: {_WGMMA_FAILED}" if _WGMMA_FAILED else ""
    return f"forward: mma.sync{why}"


def _ext():
    """The compiled module, imported on first use (None when it is not built/importable)."""
    global _C, _IMPORT_ERROR
    if _C is None and _IMPORT_ERROR is None:
        try:
            _C = importlib.import_module("fgpo_kernels._C")
        except Exception as exc:  # not built, or built for another Python
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _C


def supports(dtype: torch.dtype) -> bool:
    """Whether the CUDA kernels themselves run this dtype (others are delegated)."""
    return dtype in _HALF


def probe() -> dict:
    """{"available", "built", "reason"}; cached after the first full answer."""
    global _PROBE, _WGMMA_FAILED
    if _PROBE is not None:
        return _PROBE
    ext = _ext()
    if ext is None:
        return {
            "available": False,
            "built": False,
            "reason": f"fgpo_kernels._C is not built or not importable ({_IMPORT_ERROR}); "
            "reinstall with nvcc on PATH (FGPO_BUILD_CUDA=1 to make build failures loud)",
        }
    built = f"fgpo_kernels._C built for sm_{ext.ARCHS.replace(';', ', sm_')}"
    if not torch.cuda.is_available():
        detail = ""
        if torch.version.cuda is not None:  # a CUDA build: the runtime says why (driver, ...)
            _count, why = ext.device_count()
            detail = f" (CUDA runtime: {why})" if why else ""
        return {
            "available": False,
            "built": True,
            "reason": f"{built}, but {no_cuda_reason()}{detail}",
        }
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < (8, 0):
        _PROBE = {
            "available": False,
            "built": True,
            "reason": f"{built}, but {name} is sm_{cap[0]}{cap[1]}; the kernels need sm_80+",
        }
        return _PROBE
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is not None and optin < ext.SMEM_BYTES:
        _PROBE = {
            "available": False,
            "built": True,
            "reason": f"{built}, but {name} allows {optin} bytes of shared memory per block and "
            f"the kernels need {ext.SMEM_BYTES} (an sm_80/sm_90 data-center GPU)",
        }
        return _PROBE
    if _SELFTEST_RUNNING:  # called from inside the self-test: answer without recursing
        return {"available": True, "built": True, "reason": "self-test in progress"}
    fail = _self_test() if os.environ.get("FGPO_CUDA_SELFTEST", "1") != "0" else None
    if fail and fwd_choice() == "auto" and forward_path() == "wgmma":
        _WGMMA_FAILED = fail  # keep the impl, on the mma.sync forward, if that one passes
        fail = _self_test()
    if fail:
        _PROBE = {"available": False, "built": True, "reason": f"{built}; self-test FAILED: {fail}"}
    else:
        _PROBE = {
            "available": True,
            "built": True,
            "reason": f"{built}, running on {name} (sm_{cap[0]}{cap[1]}); bf16/fp16 kernels, "
            f"fp32/fp64 inputs delegated to impl 'triton' (else 'torch'); {_fwd_note()}; "
            f"{_bwd_note()}",
        }
    return _PROBE


# ---- argument preparation -----------------------------------------------------------------------


def _pad8(x: Tensor | None) -> Tensor | None:
    """Contiguous, 16-byte aligned, last dim a multiple of 8 (zero-padded copy if needed)."""
    if x is None:
        return None
    x = x.contiguous()
    d = x.shape[-1]
    if d % 8 == 0 and x.data_ptr() % 16 == 0 and d > 0:
        return x
    d8 = max(8, (d + 7) // 8 * 8)
    out = x.new_zeros(*x.shape[:-1], d8)
    out[..., :d] = x
    return out


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _plan(
    n: int, v: int, d: int, dr: int, kl: bool, device: torch.device, splits: int = 0, *,
    backward: bool = False, wgmma: bool = False,
) -> _launch.GridPlan:  # fmt: skip
    """Grid of one launch (``_launch.plan``: vocabulary splits in whole waves, the launch-order
    group), from the CUDA tiles (one CTA per SM: ``__launch_bounds__(THREADS, 1)``)."""
    ext = _ext()
    if ext is not None and (ext.BLOCK_ROWS, ext.BLOCK_VOCAB) != (
        _launch.CUDA_BLOCK_ROWS, _launch.CUDA_BLOCK_VOCAB,
    ):  # fmt: skip
        raise RuntimeError("fgpo_kernels._C was built with other tiles than _launch.CUDA_BLOCK_*")
    h_row, w_window = _launch.cuda_plan_inputs(d, dr, kl, backward=backward, wgmma=wgmma)
    return _launch.device_plan(
        n, v, _launch.CUDA_BLOCK_ROWS, _launch.CUDA_BLOCK_VOCAB, device, per_sm=1,
        h_row_bytes=h_row, w_window=w_window, splits=splits or None,
        tiles_per_program=1 if backward else None,
    )  # fmt: skip


def _launch_context(device: torch.device):
    """(device guard, raw cudaStream_t of the current stream) for a launch on ``device``."""
    return torch.cuda.device(device), torch.cuda.current_stream(device).cuda_stream


def _check_dtypes(h: Tensor, *others: Tensor | None) -> None:
    for name, x in zip(("hr", "w", "wr"), others):
        if x is not None and x.dtype != h.dtype:
            raise TypeError(f"impl 'cuda': {name} has dtype {x.dtype} but h has {h.dtype}")


def _check_device(x: Tensor) -> None:
    if x.device.type != "cuda":
        raise RuntimeError(f"impl 'cuda' needs CUDA tensors, got a tensor on {x.device}")
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        raise RuntimeError(f"impl 'cuda' needs an sm_80+ GPU, got {x.device}")


def _fwd_impl(h, hr, w, wr, temperature: float, splits: int) -> tuple[Tensor, ...]:
    ext = _ext()
    if ext is None:
        raise RuntimeError(f"fgpo_kernels._C is not importable: {_IMPORT_ERROR}")
    _check_device(h)
    _check_dtypes(h, hr, w, wr)
    n, v = h.shape[0], w.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    kl = hr is not None
    lse = torch.empty(n, **f32)
    lser, fkl, rkl = (torch.empty(n if kl else 0, **f32) for _ in range(3))
    if n == 0:
        return lse, lser, fkl, rkl
    h, hr, w, wr = _pad8(h), _pad8(hr), _pad8(w), _pad8(wr)
    wgmma = forward_path(h.device) == "wgmma"
    plan = _plan(n, v, h.shape[1], hr.shape[1] if kl else 0, kl, h.device, splits, wgmma=wgmma)
    s = plan.splits
    partial = torch.empty(s * (6 if kl else 2) * n, **f32)
    guard, stream = _launch_context(h.device)
    with guard:
        ext.fwd(
            _ptr(h), _ptr(hr), _ptr(w), _ptr(wr), n, h.shape[1], hr.shape[1] if kl else 0, v,
            1.0 / temperature, _DTYPE_CODE[h.dtype], s, _ptr(partial), _ptr(lse),
            _ptr(lser) if kl else 0, _ptr(fkl) if kl else 0, _ptr(rkl) if kl else 0, stream,
            group=plan.group, wgmma=wgmma,
        )  # fmt: skip
    return lse, lser, fkl, rkl


def _bwd_impl(
    h, hr, w, wr, temperature, lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr,
    need_h, need_hr, need_w, need_wr,
):  # fmt: skip
    ext = _ext()
    if ext is None:
        raise RuntimeError(f"fgpo_kernels._C is not importable: {_IMPORT_ERROR}")
    _check_device(h)
    _check_dtypes(h, hr, w, wr)
    kl, shared = hr is not None, wr is None
    n, d, v = h.shape[0], h.shape[1], w.shape[0]
    dr = hr.shape[1] if kl else 0
    need_hr = bool(need_hr and kl)
    need_wr = bool(need_wr and kl and not shared)
    hp, hrp, wp, wrp = _pad8(h), _pad8(hr), _pad8(w), _pad8(wr)
    f32 = dict(dtype=torch.float32, device=h.device)
    dh = torch.zeros(n, hp.shape[1], **f32) if need_h else None
    dhr = torch.zeros(n, hrp.shape[1], **f32) if need_hr else None
    dw = torch.zeros(v, wp.shape[1], **f32) if need_w else None
    dwr = torch.zeros(v, wrp.shape[1], **f32) if need_wr else None

    def vec(x):
        return None if x is None or x.numel() == 0 else x.to(torch.float32).contiguous()

    stats = [vec(x) for x in (lse, lser, fkl, rkl)]
    gs = [vec(x) for x in (g_fkl, g_rkl, g_lp, g_lpr)]
    if not kl:
        gs[0] = gs[1] = gs[3] = None
    if n and (need_h or need_hr or need_w or need_wr):
        plan = _plan(n, v, hp.shape[1], hrp.shape[1] if kl else 0, kl, h.device, backward=True)
        guard, stream = _launch_context(h.device)
        with guard:
            ext.bwd(
                _ptr(hp), _ptr(hrp), _ptr(wp), _ptr(wrp), n, hp.shape[1],
                hrp.shape[1] if kl else 0, v, 1.0 / temperature, _DTYPE_CODE[h.dtype],
                *(_ptr(x) for x in stats), *(_ptr(x) for x in gs),
                _ptr(dh), _ptr(dhr), _ptr(dw), _ptr(dwr), stream, group=plan.group,
            )  # fmt: skip

    def out(x, cols):
        if x is None:  # a fresh empty per output: custom-op outputs must not alias
            return torch.empty(0, **f32)
        return x if x.shape[1] == cols else x[:, :cols].contiguous()

    return out(dh, d), out(dhr, dr), out(dw, d), out(dwr, dr)


# ---- torch.library custom ops -------------------------------------------------------------------

_FWD_SCHEMA = "(Tensor h, Tensor? hr, Tensor w, Tensor? wr, float temperature, int splits) -> (Tensor, Tensor, Tensor, Tensor)"  # noqa: E501
_BWD_SCHEMA = (
    "(Tensor h, Tensor? hr, Tensor w, Tensor? wr, float temperature, Tensor lse, Tensor? lser, "
    "Tensor? fkl, Tensor? rkl, Tensor? g_fkl, Tensor? g_rkl, Tensor? g_lp, Tensor? g_lpr, "
    "bool need_h, bool need_hr, bool need_w, bool need_wr) -> (Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("fgpo::cuda_token_stats_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd_op(h, hr, w, wr, temperature, splits):
    return _fwd_impl(h, hr, w, wr, temperature, splits)


@_fwd_op.register_fake
def _(h, hr, w, wr, temperature, splits):
    n = h.shape[0]
    kl = hr is not None
    mk = lambda k: h.new_empty(k, dtype=torch.float32)
    return mk(n), mk(n if kl else 0), mk(n if kl else 0), mk(n if kl else 0)


@torch.library.custom_op("fgpo::cuda_token_stats_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd_op(h, hr, w, wr, temperature, lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr,
            need_h, need_hr, need_w, need_wr):  # fmt: skip
    return _bwd_impl(h, hr, w, wr, temperature, lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr,
                     need_h, need_hr, need_w, need_wr)  # fmt: skip


@_bwd_op.register_fake
def _(h, hr, w, wr, temperature, lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr,
      need_h, need_hr, need_w, need_wr):  # fmt: skip
    kl, shared = hr is not None, wr is None
    f32 = lambda *s: h.new_empty(*s, dtype=torch.float32)
    return (
        f32(h.shape) if need_h else f32(0),
        f32(hr.shape) if (need_hr and kl) else f32(0),
        f32(w.shape) if need_w else f32(0),
        f32(wr.shape) if (need_wr and kl and not shared) else f32(0),
    )


# ---- the _backend.py contract -------------------------------------------------------------------


def _delegate():
    """Module that runs dtypes the CUDA kernels do not (fp32/fp64): triton if usable, else torch."""
    from . import _registry

    if _registry.status("triton")["available"]:
        return _registry.module("triton")
    return _registry.module("torch")


def forward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    *, splits: int = 0,
) -> RowStats:  # fmt: skip
    """Per-row (lse, lser, fkl, rkl) fp32 (``lser``.. None in log-prob-only mode).

    ``splits`` > 0 fixes the number of vocabulary splits (tests); 0 picks it from the SM count.
    """
    if not supports(h.dtype):
        return _delegate().forward(h, hr, w, wr, temperature)
    lse, lser, fkl, rkl = _fwd_op(h, hr, w, wr, float(temperature), int(splits))
    if hr is None:
        return RowStats(lse, None, None, None)
    return RowStats(lse, lser, fkl, rkl)


def backward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    stats: RowStats, grads: RowGrads, need: Needs, *, bwd: str | None = None,
) -> Grads:  # fmt: skip
    """Contract of ``_backend.py``; ``bwd`` ("triton" / "cuda", default env FGPO_CUDA_BWD or
    "triton") picks the backward (module doc)."""
    if not supports(h.dtype):
        return _delegate().backward(h, hr, w, wr, temperature, stats, grads, need)
    if bwd_choice(bwd) == "triton":
        tri = _triton_backward()
        if tri is not None:
            return tri.backward(h, hr, w, wr, temperature, stats, grads, need, mode="gblock")
        # No usable Triton: the chunked PyTorch backward, not the CUDA kernel nobody has timed.
        from . import _registry

        return _registry.module("torch").backward(h, hr, w, wr, temperature, stats, grads, need)
    need = Needs(*need).possible(hr, wr)
    # The custom op takes flat tensors and flags (its schema has no tuples).
    out = _bwd_op(h, hr, w, wr, float(temperature), *stats, *grads, *need)
    return Grads(*(g if wanted else None for g, wanted in zip(out, need)))


# ---- self-test (first use on a GPU) -------------------------------------------------------------


# (mode, n, d, dr, v, splits, dtype, LoRA): odd shapes through every path the kernels have. D = 520
# refills the forward's 3-stage ring many times (17 slices of 32, the last one ragged) and gives
# the backward 9 chunks of 64; LoRA (hidden-state gradients only) takes the ping-pong W buffers;
# fp16 is the second instantiation of every kernel.
SELF_TEST_CASES = (
    ("shared", 40, 520, 520, 65, 0, torch.float16, True),
    ("separate", 33, 56, 24, 200, 2, torch.float16, False),
    ("shared", 70, 72, 72, 301, 3, torch.bfloat16, False),
    ("separate", 131, 40, 56, 1003, 0, torch.bfloat16, False),
    ("logprob", 9, 24, 0, 77, 2, torch.bfloat16, False),
)


def _self_test(device: torch.device | None = None) -> str | None:
    """Compare the kernels with impl 'torch' on ``SELF_TEST_CASES`` (``_selftest.run``); return
    a failure or None. ``device`` defaults to the current GPU (tests pass the CPU with the
    emulated kernels)."""
    global _SELFTEST_RUNNING
    _SELFTEST_RUNNING = True
    try:
        dev = device or torch.device("cuda", torch.cuda.current_device())
        kernel_bwd = lambda *a: backward(*a, bwd="cuda")  # the kernel, not triton's gblock
        return _selftest.run(SELF_TEST_CASES, forward, kernel_bwd, dev)
    finally:
        _SELFTEST_RUNNING = False
