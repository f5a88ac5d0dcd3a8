"""Chunked pure-PyTorch implementation of the fused token statistics (any device).

Math: see ``_backend.py``. Work is tiled in two dimensions: row chunks of R rows and vocabulary
chunks of C columns (R * C near ``FGPO_TORCH_CHUNK_ELEMS``, default 2**19 elements = 2 MB in
fp32, so that the ~10 elementwise passes per tile run from L2 cache; measured on a 2-core Xeon,
one thread, N=4096, D=512, V=32000: 2**19 -> 5.8 s, 2**22 -> 6.9 s, 2**23 -> 8.5 s fwd+bwd CPU
time, against 9.9 s for the materialized path), so only R x C tensors exist and every row chunk
streams the weight once. Small row
chunks alone would re-read the whole weight (V x D, 2 GB at V=152064, D=3584) for every few
rows; small vocabulary chunks alone would re-read the hidden states; the 2-D tiling bounds both.

Forward, per row, online over vocabulary chunks (m: running max, s: scaled sum, rescaled by
e^(m_old - m_new) as the max moves):
    s = sum e^(z - m),    A = sum e^(z - m) (z - zr),
    sr = sum e^(zr - mr), B = sum e^(zr - mr) (zr - z),
    lse = m + log s,  rkl = A / s - lse + lser,  fkl = B / sr - lser + lse.
Backward recomputes each tile's logits and uses the saved lse, lser, rkl, fkl; with
p = softmax z, r = softmax zr, d = log p - log r the logit gradients regroup as
    G  = p * (g_fkl + g_rkl * (d - rkl) - g_lp) - g_fkl * r
    Gr = r * (g_rkl - g_fkl * (d + fkl) - g_lpr) - g_rkl * p
then dh[rows] += G W[cols] / T and dW[cols] += G^T h[rows] / T (two matmuls per tile).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._backend import Grads, Needs, RowGrads, RowStats
from ._util import acc_dtype

_MIN_ROWS = 512  # rows per chunk when there are that many: the weight is read N / 512 times
_MIN_COLS = 512


def probe() -> dict:
    return {"available": True, "built": True, "reason": "pure PyTorch, any device"}


def _tiles(n: int, v: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per chunk)."""
    budget = int(os.environ.get("FGPO_TORCH_CHUNK_ELEMS", 1 << 19))
    rows = max(1, min(n, max(_MIN_ROWS, budget // max(v, 1))))
    cols = max(1, min(v, max(_MIN_COLS, budget // rows)))
    return rows, cols


def _logits(h: Tensor, w: Tensor, inv_t: float) -> Tensor:
    z = (h @ w.T).to(acc_dtype(h))
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _rescale(m: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """New running max and the factors that bring the old and the chunk sums onto it."""
    m_new = torch.maximum(m, mc)
    return m_new, torch.exp(m - m_new), torch.exp(mc - m_new)


def forward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float
) -> RowStats:
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    wr = w if wr is None else wr
    acc = acc_dtype(h)
    rows, cols = _tiles(n, v)
    lse = h.new_empty(n, dtype=acc)
    kl = hr is not None
    if kl:
        lser, fkl, rkl = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        hs = h[s0:s1]
        if cols == v and not kl:
            lse[s0:s1] = torch.logsumexp(_logits(hs, w, inv_t), dim=-1)
            continue
        k = s1 - s0
        m = torch.full((k,), float("-inf"), dtype=acc, device=h.device)
        s = torch.zeros(k, dtype=acc, device=h.device)
        if kl:
            mr, sr, a, b = m.clone(), s.clone(), s.clone(), s.clone()
            hrs = hr[s0:s1]
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            z = _logits(hs, w[c0:c1], inv_t)
            mc = z.amax(-1)
            if kl:
                zr = _logits(hrs, wr[c0:c1], inv_t)
                dz = z - zr
                mrc = zr.amax(-1)
            e = z.sub_(mc.unsqueeze(-1)).exp_()
            m, f_old, f_new = _rescale(m, mc)
            s = s * f_old + e.sum(-1) * f_new
            if kl:
                a = a * f_old + torch.linalg.vecdot(e, dz) * f_new
                er = zr.sub_(mrc.unsqueeze(-1)).exp_()
                mr, fr_old, fr_new = _rescale(mr, mrc)
                sr = sr * fr_old + er.sum(-1) * fr_new
                b = b * fr_old - torch.linalg.vecdot(er, dz) * fr_new
        lse[s0:s1] = m + s.log()
        if kl:
            lser[s0:s1] = mr + sr.log()
            rkl[s0:s1] = a / s - lse[s0:s1] + lser[s0:s1]
            fkl[s0:s1] = b / sr - lser[s0:s1] + lse[s0:s1]
    if not kl:
        return RowStats(lse, None, None, None)
    return RowStats(lse, lser, fkl, rkl)


def _col(x: Tensor | None, like: Tensor) -> Tensor | None:
    """A per-row vector as an (n, 1) column in the accumulation dtype; None stays None."""
    return None if x is None else x.to(acc_dtype(like)).unsqueeze(-1)


def _nonzero(g: Tensor | None) -> Tensor | None:
    return g if g is not None and bool((g != 0).any()) else None


def backward(
    h: Tensor,
    hr: Tensor | None,
    w: Tensor,
    wr: Tensor | None,
    temperature: float,
    stats: RowStats,
    grads: RowGrads,
    need: Needs,
) -> Grads:
    lse, lser, fkl, rkl = stats
    need_h, need_hr, need_w, need_wr = need
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    shared = wr is None
    wr_ = w if shared else wr
    g_fkl, g_rkl, g_lp, g_lpr = (_nonzero(g) for g in grads)

    def zeros(x: Tensor, need: bool) -> Tensor | None:
        return torch.zeros(x.shape, dtype=acc_dtype(x), device=x.device) if need else None

    dh, dw = zeros(h, need_h), zeros(w, need_w)
    dhr = zeros(hr, need_hr) if hr is not None else None
    dwr = zeros(wr, need_wr) if not shared else None
    kl_grads = g_fkl is not None or g_rkl is not None
    need_pol = need_h or need_w
    need_ref = hr is not None and (need_hr or (need_w if shared else need_wr))
    # Without KL gradients the reference only matters through its own log-probs.
    use_ref = hr is not None and (kl_grads or g_lpr is not None)
    gf, grk, glp, glr = (_col(g, h) for g in (g_fkl, g_rkl, g_lp, g_lpr))
    rows, cols = _tiles(n, v)
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        hs = h[s0:s1]
        hrs = hr[s0:s1] if use_ref else None
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            logp = _logits(hs, w[c0:c1], inv_t).sub_(lse[s0:s1].unsqueeze(-1))
            if not use_ref:  # G = -g_lp * p
                if glp is not None and need_pol:
                    g = logp.exp_().mul_(-glp[s0:s1])
                    _accumulate(g, hs, w, dh, dw, s0, s1, c0, c1, inv_t)
                continue
            logr = _logits(hrs, wr_[c0:c1], inv_t).sub_(lser[s0:s1].unsqueeze(-1))
            d = logp - logr if kl_grads else None
            p, r = logp.exp_(), logr.exp_()
            if need_ref:
                gref = _grad_ref(p, r, d, gf, grk, glr, fkl, s0, s1)
            if need_pol:
                gpol = _grad_pol(p, r, d, gf, grk, glp, rkl, s0, s1)
                if gpol is not None:
                    _accumulate(gpol, hs, w, dh, dw, s0, s1, c0, c1, inv_t)
            if need_ref and gref is not None:
                tgt_dw = dw if shared else dwr
                _accumulate(gref, hrs, wr_, dhr, tgt_dw, s0, s1, c0, c1, inv_t)
    return Grads(dh, dhr, dw, dwr)


def _grad_pol(p, r, d, gf, grk, glp, rkl, s0, s1) -> Tensor | None:
    """G = p * (g_fkl + g_rkl * (d - rkl) - g_lp) - g_fkl * r  (reuses d's buffer)."""
    coef = None
    if grk is not None:
        coef = d.sub_(rkl[s0:s1].unsqueeze(-1)).mul_(grk[s0:s1])
    lin = None
    if gf is not None:
        lin = gf[s0:s1]
    if glp is not None:
        lin = -glp[s0:s1] if lin is None else lin - glp[s0:s1]
    if coef is None and lin is None:
        return None
    if coef is None:
        g = p * lin
    else:
        g = coef.add_(lin).mul_(p) if lin is not None else coef.mul_(p)
    if gf is not None:
        g.sub_(r * gf[s0:s1])
    return g


def _grad_ref(p, r, d, gf, grk, glr, fkl, s0, s1) -> Tensor | None:
    """Gr = r * (g_rkl - g_fkl * (d + fkl) - g_lpr) - g_rkl * p  (new buffer)."""
    coef = None
    if gf is not None:
        coef = (d + fkl[s0:s1].unsqueeze(-1)).mul_(-gf[s0:s1])
    lin = None
    if grk is not None:
        lin = grk[s0:s1]
    if glr is not None:
        lin = -glr[s0:s1] if lin is None else lin - glr[s0:s1]
    if coef is None and lin is None:
        return None
    if coef is None:
        g = r * lin
    else:
        g = (coef.add_(lin) if lin is not None else coef).mul_(r)
    if grk is not None:
        g.sub_(p * grk[s0:s1])
    return g


def _accumulate(g: Tensor, hs: Tensor, w: Tensor, dh, dw, s0, s1, c0, c1, inv_t) -> None:
    """dh[s0:s1] += g @ w[c0:c1] / T ; dw[c0:c1] += g.T @ hs / T (accumulated in fp32)."""
    wc = w[c0:c1]
    if dh is not None:
        if wc.dtype == g.dtype:
            dh[s0:s1].addmm_(g, wc, alpha=inv_t)
        else:
            dh[s0:s1].add_((g.to(wc.dtype) @ wc).to(dh.dtype), alpha=inv_t)
    if dw is not None:
        if hs.dtype == g.dtype:
            dw[c0:c1].addmm_(g.T, hs, alpha=inv_t)
        else:
            dw[c0:c1].add_((g.T.to(hs.dtype) @ hs).to(dw.dtype), alpha=inv_t)
