"""Chunked pure-PyTorch implementation of the fused token statistics (any device).

Math: see ``_backend.py``. Rows are processed in chunks of ``c`` rows so that only c x V
tensors exist at a time (c is chosen so that c * V stays near ``FGPO_TORCH_CHUNK_ELEMS``,
default 2**21 elements = 8 MB in fp32, which keeps the elementwise passes in cache). The forward
keeps nothing but per-row statistics; the backward recomputes each chunk's logits and
accumulates dh (per chunk) and dw (over chunks) with two matmuls.

With p = softmax(z), r = softmax(zr), d = log p - log r the logit gradients regroup as
    G  = p * (g_fkl + g_rkl * (d - rkl) - g_lp) - g_fkl * r
    Gr = r * (g_rkl - g_fkl * (d + fkl) - g_lpr) - g_rkl * p
which needs two full-size temporaries beyond p and r (d and one gradient buffer).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def probe() -> dict:
    return {"available": True, "built": True, "reason": "pure PyTorch, any device"}


def _chunk_rows(n: int, v: int) -> int:
    budget = int(os.environ.get("FGPO_TORCH_CHUNK_ELEMS", 1 << 21))
    return max(1, min(n, budget // max(v, 1)))


def _log_softmax(h: Tensor, w: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """(log_softmax(h @ w.T / T) in fp32, lse) for one chunk, reusing one buffer."""
    z = _logits(h, w, inv_t)
    lse = torch.logsumexp(z, dim=-1)
    return z.sub_(lse.unsqueeze(-1)), lse


def forward(h, hr, w, wr, temperature):
    n = h.shape[0]
    inv_t = 1.0 / temperature
    wr = w if wr is None else wr
    lse = h.new_empty(n, dtype=_acc(h))
    step = _chunk_rows(n, w.shape[0])
    if hr is None:
        for s in range(0, n, step):
            lse[s : s + step] = _lse(h[s : s + step], w, inv_t)
        return lse, None, None, None
    lser, fkl, rkl = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)
    for s in range(0, n, step):
        e = min(n, s + step)
        logp, lse[s:e] = _log_softmax(h[s:e], w, inv_t)
        logr, lser[s:e] = _log_softmax(hr[s:e], wr, inv_t)
        d = logp - logr
        fkl[s:e] = -torch.linalg.vecdot(logr.exp_(), d)
        rkl[s:e] = torch.linalg.vecdot(logp.exp_(), d)
    return lse, lser, fkl, rkl


def _lse(h: Tensor, w: Tensor, inv_t: float) -> Tensor:
    return torch.logsumexp(_logits(h, w, inv_t), dim=-1)


def _col(x: Tensor | None, n: int, like: Tensor) -> Tensor:
    """A per-row vector as an (n, 1) column; None means zero."""
    if x is None:
        return like.new_zeros(n, 1, dtype=_acc(like))
    return x.to(_acc(like)).unsqueeze(-1)


def backward(
    h,
    hr,
    w,
    wr,
    temperature,
    lse,
    lser,
    fkl,
    rkl,
    g_fkl,
    g_rkl,
    g_lp,
    g_lpr,
    need_h,
    need_hr,
    need_w,
    need_wr,
):
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    shared = wr is None
    wr_ = w if shared else wr

    def zeros(x: Tensor, need: bool) -> Tensor | None:
        return torch.zeros(x.shape, dtype=_acc(x), device=x.device) if need else None

    dh, dw = zeros(h, need_h), zeros(w, need_w)
    if hr is None:
        glp = _col(g_lp, n, h)
        step = _chunk_rows(n, v)
        for s in range(0, n, step):
            e = min(n, s + step)
            logp = _logits(h[s:e], w, inv_t).sub_(lse[s:e].unsqueeze(-1))
            _accumulate(logp.exp_().mul_(-glp[s:e]), h[s:e], w, dh, dw, s, e, inv_t)
        return dh, None, dw, None

    dhr = zeros(hr, need_hr)
    dwr = zeros(wr, need_wr) if not shared else None
    need_pol = need_h or need_w
    need_ref = need_hr or (need_w if shared else need_wr)
    gf, grk, glp, glr = (_col(x, n, h) for x in (g_fkl, g_rkl, g_lp, g_lpr))
    fk, rk = fkl.unsqueeze(-1), rkl.unsqueeze(-1)
    step = _chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        hs, hrs = h[s:e], hr[s:e]
        logp = _logits(hs, w, inv_t).sub_(lse[s:e].unsqueeze(-1))
        logr = _logits(hrs, wr_, inv_t).sub_(lser[s:e].unsqueeze(-1))
        d = logp - logr
        p, r = logp.exp_(), logr.exp_()
        if need_ref:
            # Gr = r * (g_rkl - g_fkl * (d + fkl) - g_lpr) - g_rkl * p
            gref = (d + fk[s:e]).mul_(-gf[s:e]).add_(grk[s:e] - glr[s:e]).mul_(r)
            gref.sub_(p * grk[s:e])
        if need_pol:
            # G = p * (g_fkl + g_rkl * (d - rkl) - g_lp) - g_fkl * r   (d is dead after this)
            gpol = d.sub_(rk[s:e]).mul_(grk[s:e]).add_(gf[s:e] - glp[s:e]).mul_(p)
            gpol.sub_(r.mul_(gf[s:e]))
            _accumulate(gpol, hs, w, dh, dw, s, e, inv_t)
        if need_ref:
            _accumulate(gref, hrs, wr_, dhr, dw if shared else dwr, s, e, inv_t)
    return dh, dhr, dw, dwr


def _acc(x: Tensor) -> torch.dtype:
    """fp32 accumulation, except that float64 input stays float64 (exact checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(h: Tensor, w: Tensor, inv_t: float) -> Tensor:
    z = (h @ w.T).to(_acc(h))
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _accumulate(g: Tensor, hs: Tensor, w: Tensor, dh, dw, s: int, e: int, inv_t: float) -> None:
    """dh[s:e] = g @ w / T ; dw += g.T @ hs / T (fp32 accumulation)."""
    if dh is not None:
        if w.dtype == g.dtype:
            torch.mm(g, w, out=dh[s:e])
            if inv_t != 1.0:
                dh[s:e].mul_(inv_t)
        else:
            dh[s:e] = (g.to(w.dtype) @ w).float().mul_(inv_t)
    if dw is not None:
        if hs.dtype == g.dtype:
            dw.addmm_(g.T, hs, alpha=inv_t)
        else:
            dw.add_((g.T.to(hs.dtype) @ hs).float(), alpha=inv_t)
