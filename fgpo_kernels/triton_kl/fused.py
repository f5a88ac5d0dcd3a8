"""Triton: gradients computed in the forward, for the few-rows case (docs/design.md §3.8).

When the logits of all rows fit the byte budget (N x V fp32, twice with a reference: the masked
rows of one training step on a GPU), the forward kernel writes every logit tile while it
computes the statistics (``fwd.py``, STORE_LOGITS), and the gblock G kernel reads them back
instead of recomputing them (``bwd_gblock.py``, FROM_LOGITS): 2 logit matmuls + dH (+ dW), not
2 + 2 + dH (+ dW). Larger N declines (returns None) and keeps the streaming path.

    forward_with_grads: incoming per-row gradients known at forward time -> dh, dhr, dw, dwr
    forward_with_jacobians: frozen head -> per-row d(fkl, rkl, lp)/dh_i, each one G pass with
        unit gradients (dlogp/dh without the one-hot row: G = -p)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import Grads, Needs, RowGrads, RowJacobians, RowStats
from .bwd_gblock import backward_gblock
from .common import logit_buffer, logit_stride
from .fwd import forward


def _held_logits(h: Tensor, hr: Tensor | None, w: Tensor, budget: int):
    """(z, zr) fp32 (N, V) buffers when they fit ``budget`` bytes, else None."""
    n, v = h.shape[0], w.shape[0]
    if n * logit_stride(v) * 4 * (2 if hr is not None else 1) > budget:  # padded rows
        return None
    z = logit_buffer(n, v, h.device)
    return z, (logit_buffer(n, v, h.device) if hr is not None else None)


def forward_with_grads(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    grads: RowGrads, need: Needs, budget: int,
) -> tuple[RowStats, Grads] | None:  # fmt: skip
    """``forward`` + ``backward(..., grads, need)`` over logits kept in between (None: over
    budget)."""
    logits = _held_logits(h, hr, w, budget)
    if logits is None:
        return None
    stats = forward(h, hr, w, wr, temperature, logits=logits)
    out = backward_gblock(h, hr, w, wr, temperature, stats, RowGrads(*grads), Needs(*need),
                          logits=logits)  # fmt: skip
    return stats, out


def forward_with_jacobians(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float,
    n_kl: int, budget: int,
) -> tuple[RowStats, RowJacobians] | None:  # fmt: skip
    """``forward`` + per-row gradients of fkl, rkl (first ``n_kl`` rows) and lp w.r.t. h (None:
    over budget)."""
    logits = _held_logits(h, hr, w, budget)
    if logits is None:
        return None
    stats = forward(h, hr, w, wr, temperature, logits=logits)
    n = h.shape[0]
    only_h = Needs(True, False, False, False)
    ones = torch.ones(n, dtype=torch.float32, device=h.device)

    def dh(rows: int, grads: RowGrads) -> Tensor:
        """d(sum of the unit-weighted outputs)/dh of the first ``rows`` rows: row i's own."""
        z, zr = logits
        sub = RowStats(*(None if x is None else x[:rows] for x in stats))
        held = (z[:rows], None if zr is None else zr[:rows])
        part = backward_gblock(h[:rows], None if hr is None else hr[:rows], w, wr, temperature,
                               sub, grads, only_h, logits=held)  # fmt: skip
        return part.dh

    # G = -g_lp p with g_lp = 1 is dlogp/dz without its one-hot part.
    jp = dh(n, RowGrads(None, None, ones, None))
    if hr is None or n_kl == 0:
        empty = torch.zeros((0, h.shape[1]), dtype=torch.float32, device=h.device)
        return stats, RowJacobians(None if hr is None else empty, None if hr is None else empty,
                                   jp)  # fmt: skip
    unit = ones[:n_kl]
    jf = dh(n_kl, RowGrads(unit, None, None, None))
    jr = dh(n_kl, RowGrads(None, unit, None, None))
    return stats, RowJacobians(jf, jr, jp)
