"""The contract between the public ops and each fused implementation, as types.

Every impl except ``reference`` is a module that satisfies :class:`Backend`: ``probe``,
``forward`` and ``backward`` with the signatures below (``torch_impl``, ``triton_kl``,
``cuda_kl``; ``_registry`` finds them). The public layer (``token_kl.py``) validates input,
flattens rows, drops rows that need no work, handles temperature bookkeeping, the target logit
(a cheap gather-dot) and the one-hot part of the log-prob gradient, so a backend only does the
dense (rows x vocabulary) work, streaming over the vocabulary and never materializing rows x V.

Notation (row i, vocabulary index j, T = temperature):
    z   = h  @ w.T  / T        p = softmax(z),  lse  = logsumexp(z)
    zr  = hr @ wr.T / T        r = softmax(zr), lser = logsumexp(zr)
    d   = log p - log r
    fkl = KL(r || p) = sum_j r (log r - log p)
    rkl = KL(p || r) = sum_j p (log p - log r)

forward(h, hr, w, wr, temperature) -> RowStats(lse, lser, fkl, rkl)
    h  (N, D)  float tensor, contiguous.       w  (V, D) same dtype as h.
    hr (N, Dr) or None (log-prob-only mode: RowStats(lse, None, None, None)).
    wr (V, Dr) or None: None means the reference shares ``w`` (then Dr == D); load each tile of
       ``w`` once and use it for both dots.
    Every statistic is a float32 tensor of shape (N,).

backward(h, hr, w, wr, temperature, stats: RowStats, grads: RowGrads, need: Needs) -> Grads
    The dense gradient w.r.t. the logits of each row is
        G  = g_fkl * (p - r) + g_rkl * p * (d - rkl) - g_lp * p
        Gr = g_fkl * r * (-d - fkl) + g_rkl * (r - p) - g_lpr * r
    (the one-hot part of the log-prob gradients is added by the caller), and
        dh = G @ w / T, dhr = Gr @ wr / T, dw = G.T @ h / T, dwr = Gr.T @ hr / T.
    ``grads`` are float32 (N,) tensors (g_lpr, g_fkl, g_rkl may be None = zero; in log-prob-only
    mode hr and stats.lser/fkl/rkl are None and only G = -g_lp * p is used).
    When wr is None (shared weight) and need.w, dw holds G.T @ h / T + Gr.T @ hr / T and dwr is
    None. Gradients that are not needed are None. Returned gradients are float32 (the caller
    casts to the input dtype).

Optional: gradients computed in the forward (docs/design.md §3.8). A backend without these
functions, or one that returns None from them (declined, e.g. over the byte budget), gets the
plain ``forward`` and recomputes in ``backward``.

forward_with_grads(h, hr, w, wr, temperature, grads: RowGrads, need: Needs, budget: int)
    -> (RowStats, Grads) | None
    ``forward`` and ``backward(..., grads, need)`` at once, for incoming per-row gradients that
    are known at forward time (the token_kl loss). Since row i's outputs depend on row i of h
    only, dh[i] (and dhr[i]) scale with row i's incoming gradient; dw and dwr are sums over the
    rows. ``budget`` bounds the bytes of logits kept between the statistics and the gradient.

forward_with_jacobians(h, hr, w, wr, temperature, n_kl: int, budget: int)
    -> (RowStats, RowJacobians) | None
    ``forward`` plus the gradient of each per-row output w.r.t. its own row of h, for a frozen
    head and reference (only h needs a gradient): any later incoming gradients g give
    dh[i] = g_fkl[i] * fkl[i] + g_rkl[i] * rkl[i] + g_lp[i] * lp[i] (+ the one-hot row of the
    log-prob that the caller adds). ``fkl``/``rkl`` cover the first ``n_kl`` rows only.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class RowStats(NamedTuple):
    """Per-row statistics of the forward, saved for the backward: float32 ``(N,)`` each;
    ``lser``, ``fkl``, ``rkl`` are None in log-prob-only mode."""

    lse: Tensor
    lser: Tensor | None
    fkl: Tensor | None
    rkl: Tensor | None


def finish_kl(m: Tensor, s: Tensor, a: Tensor, mr: Tensor, sr: Tensor, b: Tensor) -> RowStats:
    """The one KL finish of every streaming impl (csrc/tile_math.h ``kl_finish`` is its C++
    twin): per-row maxima ``m``, ``mr``, scaled sums ``s`` = sum e^(z - m), ``sr``, and cross
    sums ``a`` = sum e^(z - m) (z - zr), ``b`` = sum e^(zr - mr) (zr - z), all over the whole
    vocabulary, to (lse, lser, fkl, rkl).

    rkl = a/s - (lse - lser) and fkl = b/sr + (lse - lser). lse and lser are near 30-80 for real
    logits while the KL of nearly equal models is 1e-4, so their difference is formed as
    (m - mr) + (log s - log sr): each bracket is O(1), so the fp32 rounding stays near ulp(log s)
    instead of ulp(lse) (tests/test_kl_numerics.py holds every impl to it)."""
    log_s, log_sr = torch.log(s), torch.log(sr)
    dlse = (m - mr) + (log_s - log_sr)  # lse - lser
    return RowStats(m + log_s, mr + log_sr, b / sr + dlse, a / s - dlse)


class RowGrads(NamedTuple):
    """Incoming per-row gradients: float32 ``(N,)`` each, or None (= zero)."""

    g_fkl: Tensor | None
    g_rkl: Tensor | None
    g_lp: Tensor | None
    g_lpr: Tensor | None


class RowJacobians(NamedTuple):
    """Per-row gradients of each output w.r.t. its own row of h (float32): ``fkl``, ``rkl``
    ``(n_kl, D)`` (None without a reference), ``lp`` ``(N, D)`` without the one-hot row
    ``W[y] / T``, which the caller adds."""

    fkl: Tensor | None
    rkl: Tensor | None
    lp: Tensor


class Needs(NamedTuple):
    """Which inputs need a gradient (``h``, ``hr``, ``w``, ``wr``)."""

    h: bool
    hr: bool
    w: bool
    wr: bool

    def possible(self, hr: Tensor | None, wr: Tensor | None) -> Needs:
        """The needs that can exist: ``hr`` only with a reference, ``wr`` only with a
        separate reference weight (a shared weight's gradient is all in ``w``)."""
        has_ref = hr is not None
        return Needs(
            bool(self.h),
            bool(self.hr and has_ref),
            bool(self.w),
            bool(self.wr and has_ref and wr is not None),
        )


class Grads(NamedTuple):
    """Gradients w.r.t. ``h``, ``hr``, ``w``, ``wr``: float32, None where not needed."""

    dh: Tensor | None
    dhr: Tensor | None
    dw: Tensor | None
    dwr: Tensor | None


@runtime_checkable
class Backend(Protocol):
    """What ``_registry.module(name)`` returns: a module with these three functions."""

    def probe(self) -> dict:
        """``{"available": bool, "built": bool, "reason": str}`` (cheap; never raises)."""
        ...

    def forward(
        self, h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float
    ) -> RowStats: ...

    def backward(
        self,
        h: Tensor,
        hr: Tensor | None,
        w: Tensor,
        wr: Tensor | None,
        temperature: float,
        stats: RowStats,
        grads: RowGrads,
        need: Needs,
    ) -> Grads: ...
