"""impl "triton": the fused token statistics as Triton kernels (contract: ``_backend.py``).

Math (row i, vocabulary index j, T = temperature; p = softmax z, r = softmax zr):
    z = h W^T / T,  zr = hr Wr^T / T,  lse = logsumexp z,  lser = logsumexp zr,
    rkl = KL(p || r),  fkl = KL(r || p)                       (forward: ``fwd.py``)
    G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p            (d = log p - log r)
    Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r
    dh = G W / T,  dW = G^T h / T,  dhr = Gr Wr / T,  dWr = Gr^T hr / T   (backward)

Where things are: ``fwd.py`` (forward kernel + host), ``bwd_gblock.py`` (default backward: G
chunks in Triton, then library GEMMs), ``bwd_atomic.py`` (backward with fp32 atomics),
``fused.py`` (gradients in the forward for the few-rows case: the forward keeps the logits and
the gblock G kernel reads them), ``common.py`` (the jit tile helpers every kernel shares, input
checks), ``configs.py`` (the GPU tile table, vocabulary splits, backward mode and gblock chunk
width). The forward splits the
vocabulary across programs so that few rows still fill the GPU; the backward mode comes from
env FGPO_TRITON_BWD ("gblock" or "atomic"). Design, and why gblock is the default:
``docs/kernels/triton.md``; measurements and open GPU questions: ``benchmarks/notes_triton.md``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .. import _selftest
from .._backend import Grads, Needs, RowGrads, RowStats
from .._util import no_cuda_reason, triton_interpret
from .bwd_atomic import backward_atomic
from .bwd_gblock import backward_gblock
from .common import IMPORT_ERROR, interpreter_loop_error, triton
from .configs import (
    BWD_MODES,
    GPU_CONFIGS,
    KernelConfig,
    bwd_mode,
    chunk_columns,
    gblock_budget,
    gblock_elems,
    gpu_config_name,
    grid_plan,
)
from .fused import forward_with_grads, forward_with_jacobians
from .fwd import forward

__all__ = [
    "BWD_MODES",
    "GPU_CONFIGS",
    "KernelConfig",
    "backward",
    "bwd_mode",
    "chunk_columns",
    "forward",
    "forward_with_grads",
    "forward_with_jacobians",
    "gblock_budget",
    "gblock_elems",
    "gpu_config_name",
    "grid_plan",
    "probe",
]


@functools.cache
def _old_interpreter() -> str | None:
    """Why the CPU interpreter cannot run these kernels (``common.interpreter_loop_error``, tried
    once per process), or None."""
    return interpreter_loop_error()


# (mode, n, d, dr, v, splits, dtype, LoRA) for ``_selftest``: D = 528 wraps the forward's 3-stage
# ring of 64-wide slices (9 of them) and, with 8 vocabulary tiles over 3 splits, runs its
# flattened loop across tiles; LoRA against a frozen reference takes entry "g" (G alone, a
# split of tiles per program in one flattened loop); a trained shared head writes G and Gr
# (entry "g_both", and a 3-column tail on "g_narrow": 515 = 32 x 16 + 3); D != Dr; fp16 is the
# second instantiation of every kernel. Each case also runs the forward that keeps its logits
# and the G kernel reading them back (``forward_with_grads``, and ``forward_with_jacobians``:
# the frozen-head plan of LoRA training; TMA tiles on sm_90).
SELF_TEST_CASES = (
    ("shared", 40, 528, 528, 1003, 3, torch.bfloat16, "frozen-ref"),
    ("shared", 33, 96, 96, 515, 2, torch.float16, False),
    ("separate", 70, 64, 48, 301, 0, torch.bfloat16, False),
    ("logprob", 9, 32, 0, 77, 1, torch.float16, False),
)
_PROBE: dict | None = None  # the answer on a GPU, once its self-test has run


def _self_test(device: torch.device | None = None) -> str | None:
    """The kernels triton compiled for this GPU against impl 'torch' on ``SELF_TEST_CASES``
    (``_selftest.run``): forward, backward (the configured mode), the gradients from kept
    logits and the per-row jacobians; the first failure, or None. ``device``: the current GPU
    unless given (tests pass the CPU under the interpreter)."""
    from .. import torch_impl

    dev = device or torch.device("cuda", torch.cuda.current_device())
    budget, fwd_tol, bwd_tol = 1 << 30, _selftest.FWD_TOL, _selftest.BWD_TOL

    def kept(case, ref: RowStats, ref_b: Grads) -> str | None:
        out = forward_with_grads(*case.args, 0.9, case.grads, case.need, budget)
        n_kl = max(case.args[0].shape[0] - 2, 0)  # the rows after n_kl: log-prob only
        jac = forward_with_jacobians(*case.args, 0.9, n_kl, budget)
        if out is None or jac is None:
            return f"{case.what}: the kept logits did not fit a 1 GiB budget"
        ref_j = torch_impl.forward_with_jacobians(*case.args32, 0.9, n_kl, budget)[1]
        stat_names, grad_names = ("lse", "lser", "fkl", "rkl"), ("dh", "dhr", "dw", "dwr")
        return (_selftest.compare(f"{case.what} kept-logit forward", stat_names, out[0], ref,
                                  fwd_tol)
                or _selftest.compare(f"{case.what} kept-logit backward", grad_names, out[1],
                                     ref_b, bwd_tol)
                or _selftest.compare(f"{case.what} jacobian", ("fkl", "rkl", "lp"), jac[1],
                                     ref_j, bwd_tol))  # fmt: skip

    return _selftest.run(SELF_TEST_CASES, forward, backward, dev, extra=kept)


def probe() -> dict:
    """{"available", "built", "reason"}. On a GPU the first call runs ``_self_test`` (env
    FGPO_TRITON_SELFTEST=0 skips it) and the answer is kept."""
    global _PROBE
    if _PROBE is not None:
        return _PROBE
    if triton is None:
        return {
            "available": False,
            "built": False,
            "reason": f"triton not importable: {IMPORT_ERROR}",
        }
    if not torch.cuda.is_available() and not triton_interpret():
        return {
            "available": False,
            "built": True,
            "reason": f"{no_cuda_reason()} (set TRITON_INTERPRET=1 to run on CPU tensors)",
        }
    if triton_interpret() and (why := _old_interpreter()):
        return {
            "available": False,
            "built": True,
            "reason": f"triton {triton.__version__}'s interpreter failed a kernel with a loop of "
            f"runtime bound here ({why}; triton 3.6's always does under numpy 2: needs triton "
            ">= 3.7 to run on CPU)",
        }
    if triton_interpret():
        mode = f"triton {triton.__version__}, interpreter (TRITON_INTERPRET=1)"
        return {"available": True, "built": True, "reason": mode}
    name = torch.cuda.get_device_name()
    fail = _self_test() if os.environ.get("FGPO_TRITON_SELFTEST", "1") != "0" else None
    if fail:
        why = f"triton {triton.__version__} on {name}; self-test FAILED: {fail}"
        _PROBE = {"available": False, "built": True, "reason": why}
    else:
        _PROBE = {"available": True, "built": True,
                  "reason": f"triton {triton.__version__}, CUDA ({name})"}  # fmt: skip
    return _PROBE


def backward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    stats: RowStats, grads: RowGrads, need: Needs,
    *, config: KernelConfig | None = None, mode: str | None = None,
    chunk_elems: int | None = None,
) -> Grads:  # fmt: skip
    """Contract of ``_backend.py``. ``mode`` ("gblock" / "atomic", default env FGPO_TRITON_BWD
    or gblock), ``config`` (kernel tiles) and ``chunk_elems`` (gblock buffer budget, default env
    FGPO_TRITON_GBLOCK_ELEMS, else a share of the GPU's free memory, else 2^25) override the
    defaults (tests, benchmarks)."""
    args = (h, hr, w, wr, temperature, RowStats(*stats), RowGrads(*grads), Needs(*need))
    if bwd_mode(mode) == "gblock":
        return backward_gblock(*args, config=config, chunk_elems=chunk_elems)
    return backward_atomic(*args, config=config)
