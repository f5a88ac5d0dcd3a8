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

import torch
from torch import Tensor

from .._backend import Grads, Needs, RowGrads, RowStats
from .._util import no_cuda_reason, triton_interpret
from .bwd_atomic import backward_atomic
from .bwd_gblock import backward_gblock
from .common import IMPORT_ERROR, triton
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
            "reason": f"triton not importable: {IMPORT_ERROR}",
        }
    if not torch.cuda.is_available() and not triton_interpret():
        return {
            "available": False,
            "built": True,
            "reason": f"{no_cuda_reason()} (set TRITON_INTERPRET=1 to run on CPU tensors)",
        }
    if triton_interpret() and _old_interpreter():
        return {
            "available": False,
            "built": True,
            "reason": f"triton {triton.__version__}'s interpreter cannot run loops with runtime "
            "bounds under numpy 2 (needs triton >= 3.7 to run on CPU)",
        }
    mode = "interpreter (TRITON_INTERPRET=1)" if triton_interpret() else "CUDA"
    return {"available": True, "built": True, "reason": f"triton {triton.__version__}, {mode}"}


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
