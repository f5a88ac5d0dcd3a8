"""Chunked pure-PyTorch implementation of the fused token statistics (any device).

Math: see ``_backend.py``. Work is tiled in two dimensions: row chunks of R rows and vocabulary
chunks of C columns (R * C near ``FGPO_TORCH_CHUNK_ELEMS``, default 2**18), so only R x C
tensors exist and every row chunk streams the weight once. Policy and reference tiles are
stacked (2R x C, ``_Chunk``) so that each elementwise pass covers both models: 2**18 keeps a
stacked fp32 tile at 2 MB and its ~10 elementwise passes in L2 cache (measured on a 2-core
Xeon, one thread, N=4096, D=512, V=32000, unstacked tiles: 2**19 -> 5.8 s, 2**22 -> 6.9 s,
2**23 -> 8.5 s fwd+bwd CPU time, against 9.9 s for the materialized path; stacked, N=1024:
2**18 per model 1.27-1.60 s against 2**19 1.41-1.51 s, held plan, under a load of 3). Small
row chunks alone would re-read the whole weight (V x D, 2 GB at V=152064, D=3584) for every few
rows; small vocabulary chunks alone would re-read the hidden states; the 2-D tiling bounds both.

Forward, per row, online over vocabulary chunks (m: running max, s: scaled sum, rescaled by
e^(m_old - m_new) as the max moves):
    s = sum e^(z - m),    A = sum e^(z - m) (z - zr),
    sr = sum e^(zr - mr), B = sum e^(zr - mr) (zr - z),
    lse = m + log s,  rkl = A / s - lse + lser,  fkl = B / sr - lser + lse
(``_backend.finish_kl``: lse - lser formed as (m - mr) + (log s - log sr)).
Backward recomputes each tile's logits and uses the saved lse, lser, rkl, fkl; with
p = softmax z, r = softmax zr, d = log p - log r the logit gradients regroup as
    G  = p * (g_fkl + g_rkl * (d - rkl) - g_lp) - g_fkl * r
    Gr = r * (g_rkl - g_fkl * (d + fkl) - g_lpr) - g_rkl * p
then dh[rows] += G W[cols] / T and dW[cols] += G^T h[rows] / T (two matmuls per tile).

Gradients in the forward (the backward then only scales them; ``_backend.py``, optional part):
- ``forward_with_grads`` (incoming per-row gradients known at forward time): each row chunk
  keeps its R x V logits (R from a byte budget), finishes its statistics, then turns the kept
  logits into G in place: 2 logit matmuls + dH + dW, against 2 + 2 + dH + dW when recomputing.
- ``forward_with_jacobians`` (frozen head: only h needs a gradient): every per-row output
  depends on its own row of h only, so its gradient is one D-vector per row. Streamed like the
  forward, with p = e^(z - m) / s normalized only at the end (flash-attention style):
      sum_j p W_j = U_P / s,   U_P = sum e^(z - m) W_j            (rescaled as m moves)
      sum_j r W_j = U_S / sr,  sum_j p (d - rkl) W_j = (U_Q - (A / s) U_P) / s,
      U_Q = sum e^(z - m) (z - zr) W_j
  dlogp/dh = -U_P / (s T) (plus the one-hot row the caller adds), dfkl/dh = (U_P/s - U_S/sr)/T,
  drkl/dh = (U_Q - (A/s) U_P) / (s T): U_Q and U_S only for the first ``n_kl`` rows.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._backend import Grads, Needs, RowGrads, RowJacobians, RowStats, finish_kl
from ._util import acc_dtype

_MIN_ROWS = 512  # rows per chunk when there are that many: the weight is read N / 512 times
_MIN_COLS = 512


def probe() -> dict:
    return {"available": True, "built": True, "reason": "pure PyTorch, any device"}


def _chunk_elems() -> int:
    return int(os.environ.get("FGPO_TORCH_CHUNK_ELEMS", 1 << 18))


def _tiles(n: int, v: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per chunk)."""
    budget = _chunk_elems()
    rows = max(1, min(n, max(_MIN_ROWS, budget // max(v, 1))))
    cols = max(1, min(v, max(_MIN_COLS, budget // rows)))
    return rows, cols


def _logits(h: Tensor, w: Tensor, inv_t: float, out: Tensor | None = None) -> Tensor:
    """z = h w^T / T in the accumulation dtype (written into ``out`` when given)."""
    if out is None:
        z = (h @ w.T).to(acc_dtype(h))
    elif h.dtype == out.dtype:
        z = torch.mm(h, w.T, out=out)
    else:
        z = out.copy_(h @ w.T)
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same values: one tensor, or views of one storage (``w.detach()`` as the reference)."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


class _Chunk:
    """The hidden states of one row chunk. ``logits`` gives a tile's logits STACKED, policy rows
    on top of reference rows, so that every elementwise pass covers both models in one op; one
    matmul of [h; hr] when the reference uses the same weight (its tile is read once)."""

    def __init__(self, h, hr, w, wr, s0: int, s1: int, inv_t: float) -> None:
        self.hs, self.hrs = h[s0:s1], (None if hr is None else hr[s0:s1])
        self.w, self.wr, self.inv_t = w, (w if wr is None else wr), inv_t
        stack = hr is not None and hr.dtype == h.dtype and _same_tensor(self.w, self.wr)
        self.hcat = torch.cat([self.hs, self.hrs]) if stack else None

    def logits(self, c0: int, c1: int, ref: bool = True, out: Tensor | None = None) -> Tensor:
        """Logits of columns [c0, c1): (k, C), or (2k, C) with the reference (unless ``ref``
        is False), written into ``out`` when given."""
        k = self.hs.shape[0]
        if self.hrs is None or not ref:
            return _logits(self.hs, self.w[c0:c1], self.inv_t, out)
        if self.hcat is not None:
            return _logits(self.hcat, self.w[c0:c1], self.inv_t, out)
        if out is None:
            out = torch.empty((2 * k, c1 - c0), dtype=acc_dtype(self.hs), device=self.hs.device)
        _logits(self.hs, self.w[c0:c1], self.inv_t, out[:k])
        _logits(self.hrs, self.wr[c0:c1], self.inv_t, out[k:])
        return out


class _Online:
    """Per-row running statistics of one row chunk over vocabulary tiles (see the docstring),
    stacked like the tiles: max ``m`` and scaled sum ``s`` of the k policy rows then the k
    reference rows, and ``ab`` = [A; B]."""

    def __init__(self, k: int, kl: bool, dtype: torch.dtype, device) -> None:
        self.k, self.kl = k, kl
        rows = 2 * k if kl else k
        self.m = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros(rows, dtype=dtype, device=device)
        self.ab = torch.zeros(rows, dtype=dtype, device=device) if kl else None

    def add(self, zz: Tensor, keep: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """One stacked tile of logits (``keep=False`` lets it be overwritten). Returns
        e = exp(zz - m_new) (stacked), dz = z - zr, and f = exp(m_old - m_new), the factor
        that brought the running sums onto the new maxima."""
        k = self.k
        m_new = torch.maximum(self.m, zz.amax(-1))
        f = torch.exp(self.m - m_new)
        self.m = m_new
        dz = zz[:k] - zz[k:] if self.kl else None
        e = (zz.sub(m_new.unsqueeze(-1)) if keep else zz.sub_(m_new.unsqueeze(-1))).exp_()
        self.s = self.s * f + e.sum(-1)
        if self.kl:
            dots = torch.mul(e.view(2, k, -1), dz).sum(-1).view(-1)  # [sum e dz; sum er dz]
            dots[k:].neg_()  # B = sum er (zr - z)
            self.ab = self.ab * f + dots
        return e, dz, f

    def finish(self, stats: RowStats, s0: int, s1: int) -> None:
        """Write (lse, lser, fkl, rkl) of the chunk's rows into ``stats``."""
        k = self.k
        if not self.kl:
            stats.lse[s0:s1] = self.m + self.s.log()
            return
        m, s, ab = self.m, self.s, self.ab
        done = finish_kl(m[:k], s[:k], ab[:k], m[k:], s[k:], ab[k:])
        for out, x in zip(stats, done):
            out[s0:s1] = x


def _empty_stats(n: int, kl: bool, dtype: torch.dtype, device) -> RowStats:
    lse = torch.empty(n, dtype=dtype, device=device)
    if not kl:
        return RowStats(lse, None, None, None)
    return RowStats(lse, torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse))


def forward(
    h: Tensor, hr: Tensor | None, w: Tensor, wr: Tensor | None, temperature: float
) -> RowStats:
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    wr = w if wr is None else wr
    kl = hr is not None
    stats = _empty_stats(n, kl, acc_dtype(h), h.device)
    rows, cols = _tiles(n, v)
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        hs = h[s0:s1]
        if cols == v and not kl:
            stats.lse[s0:s1] = torch.logsumexp(_logits(hs, w, inv_t), dim=-1)
            continue
        online = _Online(s1 - s0, kl, stats.lse.dtype, h.device)
        chunk = _Chunk(h, hr, w, wr, s0, s1, inv_t)
        for c0 in range(0, v, cols):
            online.add(chunk.logits(c0, min(v, c0 + cols)), keep=False)
        online.finish(stats, s0, s1)
    return stats


def _col(x: Tensor | None, like: Tensor) -> Tensor | None:
    """A per-row vector as an (n, 1) column in the accumulation dtype; None stays None."""
    return None if x is None else x.to(acc_dtype(like)).unsqueeze(-1)


def _nonzero(g: Tensor | None) -> Tensor | None:
    return g if g is not None and bool((g != 0).any()) else None


class _GradTiles:
    """The gradient side of one call: turns each tile's log-probabilities into G (and Gr) and
    accumulates dh, dhr, dW, dWr. Shared by ``backward`` (logits recomputed) and
    ``forward_with_grads`` (logits kept from the forward)."""

    def __init__(self, h, hr, w, wr, temperature, stats: RowStats, grads: RowGrads, need: Needs):
        need_h, need_hr, need_w, need_wr = need
        self.h, self.hr, self.w, self.inv_t = h, hr, w, 1.0 / temperature
        self.shared = wr is None
        self.wr = w if self.shared else wr
        self.stats = stats
        g_fkl, g_rkl, g_lp, g_lpr = (_nonzero(g) for g in grads)

        def zeros(x: Tensor, need: bool) -> Tensor | None:
            return torch.zeros(x.shape, dtype=acc_dtype(x), device=x.device) if need else None

        self.dh, self.dw = zeros(h, need_h), zeros(w, need_w)
        self.dhr = zeros(hr, need_hr) if hr is not None else None
        self.dwr = zeros(wr, need_wr) if not self.shared else None
        self.kl_grads = g_fkl is not None or g_rkl is not None
        self.need_pol = need_h or need_w
        self.need_ref = hr is not None and (need_hr or (need_w if self.shared else need_wr))
        # Without KL gradients the reference only matters through its own log-probs.
        self.use_ref = hr is not None and (self.kl_grads or g_lpr is not None)
        self.cols = [_col(g, h) for g in (g_fkl, g_rkl, g_lp, g_lpr)]
        self.idle = not (self.use_ref or (g_lp is not None and self.need_pol))

    def tile(self, zz: Tensor, s0: int, s1: int, c0: int, c1: int):
        """One tile of stacked logits (``_Chunk.logits``; reference rows needed only when
        ``use_ref``), overwritten: log-probabilities, then probabilities, in place."""
        gf, grk, glp, glr = self.cols
        hs = self.h[s0:s1]
        k = s1 - s0
        if not self.use_ref:  # G = -g_lp * p
            if glp is not None and self.need_pol:
                logp = zz[:k].sub_(self.stats.lse[s0:s1].unsqueeze(-1))
                g = logp.exp_().mul_(-glp[s0:s1])
                _accumulate(g, hs, self.w, self.dh, self.dw, s0, s1, c0, c1, self.inv_t)
            return
        zz.sub_(torch.cat([self.stats.lse[s0:s1], self.stats.lser[s0:s1]]).unsqueeze(-1))
        d = zz[:k] - zz[k:] if self.kl_grads else None  # log p - log r
        zz.exp_()
        p, r = zz[:k], zz[k:]
        if self.need_ref:
            gref = _grad_ref(p, r, d, gf, grk, glr, self.stats.fkl, s0, s1)
        if self.need_pol:
            gpol = _grad_pol(p, r, d, gf, grk, glp, self.stats.rkl, s0, s1)
            if gpol is not None:
                _accumulate(gpol, hs, self.w, self.dh, self.dw, s0, s1, c0, c1, self.inv_t)
        if self.need_ref and gref is not None:
            dwr = self.dw if self.shared else self.dwr
            hrs = self.hr[s0:s1]
            _accumulate(gref, hrs, self.wr, self.dhr, dwr, s0, s1, c0, c1, self.inv_t)

    def result(self) -> Grads:
        return Grads(self.dh, self.dhr, self.dw, self.dwr)


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
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    tiles = _GradTiles(h, hr, w, wr, temperature, stats, grads, need)
    if tiles.idle:
        return tiles.result()
    rows, cols = _tiles(n, v)
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        chunk = _Chunk(h, hr, w, wr, s0, s1, inv_t)
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            tiles.tile(chunk.logits(c0, c1, ref=tiles.use_ref), s0, s1, c0, c1)
    return tiles.result()


def held_rows(n: int, v: int, kl: bool, dtype: torch.dtype, budget: int) -> int:
    """Rows per chunk of ``forward_with_grads``: its kept logits (R x V, twice with a
    reference) fit ``budget`` bytes (at least one row)."""
    per_row = v * torch.finfo(dtype).bits // 8 * (2 if kl else 1)
    return max(1, min(n, budget // per_row))


def forward_with_grads(
    h: Tensor,
    hr: Tensor | None,
    w: Tensor,
    wr: Tensor | None,
    temperature: float,
    grads: RowGrads,
    need: Needs,
    budget: int,
) -> tuple[RowStats, Grads]:
    """``forward`` and ``backward(..., grads, need)`` in one pass: each chunk of rows keeps its
    logits (at most ``budget`` bytes) from the statistics to the gradient tiles."""
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    kl = hr is not None
    acc = acc_dtype(h)
    stats = _empty_stats(n, kl, acc, h.device)
    tiles = _GradTiles(h, hr, w, wr, temperature, stats, grads, need)
    rows = held_rows(n, v, kl, acc, budget)
    cols = max(1, min(v, max(_MIN_COLS, _chunk_elems() // rows)))
    per = 2 if kl else 1  # logit rows kept per hidden row
    buf = torch.empty(rows * v * per, dtype=acc, device=h.device)
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        k = s1 - s0
        online = _Online(k, kl, acc, h.device)
        chunk = _Chunk(h, hr, w, wr, s0, s1, inv_t)
        kept = []
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            # Tile c of the chunk is the contiguous (per * k, c1 - c0) block at per * k * c0.
            out = buf[per * k * c0 : per * k * c1].view(per * k, c1 - c0)
            online.add(chunk.logits(c0, c1, out=out), keep=True)
            kept.append((c0, c1, out))
        online.finish(stats, s0, s1)
        if tiles.idle:
            continue
        for c0, c1, zz in kept:
            tiles.tile(zz, s0, s1, c0, c1)
    return stats, tiles.result()


def _scale_rows(u: Tensor, f: Tensor) -> None:
    """u[i] *= f[i] where f[i] != 1 (after the first tiles a row's maximum rarely moves)."""
    moved = (f != 1).nonzero().squeeze(-1)
    if moved.numel() * 4 >= f.numel():
        u.mul_(f.unsqueeze(-1))
    elif moved.numel():
        u[moved] *= f[moved].unsqueeze(-1)


def _addmm(u: Tensor, e: Tensor, wc: Tensor) -> None:
    """u += e @ wc in u's dtype (16-bit weights: e rounded to their dtype, as in backward)."""
    if wc.dtype == u.dtype:
        u.addmm_(e, wc)
    else:
        u.add_((e.to(wc.dtype) @ wc).to(u.dtype))


def forward_with_jacobians(
    h: Tensor,
    hr: Tensor | None,
    w: Tensor,
    wr: Tensor | None,
    temperature: float,
    n_kl: int,
    budget: int,
) -> tuple[RowStats, RowJacobians]:
    """``forward`` plus, per row, the gradient of its outputs w.r.t. its own row of h (the
    head is frozen): streamed, no R x V logits kept, so ``budget`` is not used."""
    del budget
    n, v = h.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    kl = hr is not None
    n_kl = n_kl if kl else 0
    wr = w if wr is None else wr
    acc = acc_dtype(h)
    stats = _empty_stats(n, kl, acc, h.device)
    u_p = torch.zeros(h.shape, dtype=acc, device=h.device)
    u_q = torch.zeros((n_kl, h.shape[1]), dtype=acc, device=h.device)
    u_s = torch.zeros_like(u_q)
    rows, cols = _tiles(n, v)
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        k = s1 - s0
        kk = max(0, min(n_kl, s1) - s0)  # rows of this chunk that need the KL gradients
        st = _Online(k, kl, acc, h.device)
        up, uq, us = u_p[s0:s1], u_q[s0 : s0 + kk], u_s[s0 : s0 + kk]
        chunk = _Chunk(h, hr, w, wr, s0, s1, inv_t)
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            wc = w[c0:c1]
            # e^(z - m) with the NEW running maxima: it adds to the rescaled sums as it is.
            ee, dz, f = st.add(chunk.logits(c0, c1), keep=False)
            _scale_rows(up, f[:k])
            _addmm(up, ee[:k], wc)
            if kk:
                _scale_rows(us, f[k : k + kk])
                _addmm(us, ee[k : k + kk], wc)
                _scale_rows(uq, f[:kk])
                _addmm(uq, ee[:kk].mul_(dz[:kk]), wc)  # e's KL rows are not used again
        st.finish(stats, s0, s1)
        s_pol = st.s[:k]
        up.div_((s_pol * temperature).unsqueeze(-1))  # sum_j p W_j / T
        if kk:
            # sum p (d - rkl) W = (U_Q - (A/s) U_P) / s; sum r W = U_S / sr  (all / T)
            c = (st.ab[:kk] / s_pol[:kk]).unsqueeze(-1)
            uq.div_((s_pol[:kk] * temperature).unsqueeze(-1)).sub_(up[:kk] * c)
            us.div_((st.s[k : k + kk] * temperature).unsqueeze(-1)).neg_().add_(up[:kk])
        up.neg_()  # dlogp/dh without the one-hot row
    if not kl:
        return stats, RowJacobians(None, None, u_p)
    return stats, RowJacobians(u_s, u_q, u_p)


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
        g.addcmul_(r, gf[s0:s1], value=-1.0)
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
        g.addcmul_(p, grk[s0:s1], value=-1.0)
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
