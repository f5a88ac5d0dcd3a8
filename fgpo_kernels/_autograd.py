"""The one autograd Function of the ops: per-row statistics of the selected rows, and where
their gradients are computed (docs/design.md §3.8).

Outputs per row: ``fkl``, ``rkl``, ``lp``, ``lpr`` and ``per`` = c (λ fkl + (1 − λ) rkl)
(0 where the row weight c is 0): the row's share of the token_kl loss. The Function picks one
of three plans at forward time; every plan gives the same gradients (tested against each
other and against float64), they differ in the matmuls done:

- ``recompute``: statistics in the forward; the backward recomputes both models' logits tile by
  tile (2 logit matmuls, then 2 again + dH (+ dW)).
- ``held`` (no targets: only the loss can carry a gradient): the incoming gradients of the loss
  rows are c λ s and c (1 − λ) s for the upstream s of ``per``, known up to s at forward time.
  The backend computes dh, dhr (per row) and dW, dWr (summed) in the forward, keeping each row
  chunk's logits under the byte budget; the backward multiplies row i by s_i (dW by s, when s
  is the same for every weighted row, as with "sum" and "mean") - 2 logit matmuls + dH + dW.
- ``jacobian`` (frozen head and reference: only h needs a gradient, targets given): every
  output of row i depends on h_i only, so the backend returns d(output)/dh_i per row and the
  backward combines them with whatever gradients arrive - 2 logit matmuls + about one dH.

Gradients that a forward-computed plan did not cover (e.g. someone differentiates
``forward_kl`` itself) are recomputed for just those inputs and rows, and a second backward
through the same graph (``retain_graph=True``) recomputes everything: the forward-computed
tensors are handed out (scaled in place) by the first backward.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from . import _registry
from ._backend import Needs, RowGrads, RowStats
from ._util import acc_dtype

log = logging.getLogger("fgpo_kernels")

# Bytes of logits a held chunk may keep (FGPO_TILE_BUDGET_MB overrides): on a CPU about the
# size of the tiles the recompute path touches per chunk; on a GPU all masked rows of a step.
DEFAULT_BUDGET_MB = {"cpu": 32.0, "cuda": 1024.0}
PLANS = ("recompute", "held", "jacobian")


def tile_budget(tile_budget_mb: float | None, device: torch.device) -> int:
    """The held-logits budget in bytes: the argument, else FGPO_TILE_BUDGET_MB, else the
    device's default."""
    src = "tile_budget_mb"
    if tile_budget_mb is None:
        raw = os.environ.get("FGPO_TILE_BUDGET_MB")
        src = "FGPO_TILE_BUDGET_MB"
        if not raw:
            return int(DEFAULT_BUDGET_MB.get(device.type, DEFAULT_BUDGET_MB["cuda"]) * 2**20)
        try:
            tile_budget_mb = float(raw)
        except ValueError:
            raise ValueError(f"{src} must be a number of MB, got {raw!r}") from None
    if isinstance(tile_budget_mb, bool) or not isinstance(tile_budget_mb, (int, float)):
        raise TypeError(f"{src} must be a number of MB or None, got {tile_budget_mb!r}")
    if not tile_budget_mb > 0:
        raise ValueError(f"{src} must be > 0 MB, got {tile_budget_mb}")
    return max(1, int(tile_budget_mb * 2**20))


def mixed(fkl: Tensor, rkl: Tensor, c: Tensor | None, lambda_: float) -> Tensor:
    """c (λ fkl + (1 − λ) rkl) per row, exactly 0 where c is 0 (even next to a NaN)."""
    mix = lambda_ * fkl + (1.0 - lambda_) * rkl
    if c is None:
        return mix
    c = c.to(mix.dtype)
    return torch.where(c != 0, c * mix, torch.zeros_like(mix))


def _target_logit(h: Tensor, w: Tensor, tgt: Tensor, valid: Tensor, inv_t: float) -> Tensor:
    """z_y per row in fp32 (a gather and a row-wise dot: N x D work, no N x V)."""
    rows = w.index_select(0, tgt.clamp(min=0))
    acc = acc_dtype(h)
    zy = torch.linalg.vecdot(h.to(acc), rows.to(acc)) * inv_t
    return torch.where(valid, zy, torch.zeros_like(zy))


def _plan(backend, h, hr, need: Needs, tgt: Tensor) -> str:
    """Which plan this call takes (see the module docstring)."""
    off = os.environ.get("FGPO_GRADS_IN_FORWARD", "auto") == "off"
    if off or h.shape[0] == 0 or not any(need):
        return "recompute"
    has_targets = bool((tgt >= 0).any())
    if not has_targets and hr is not None and hasattr(backend, "forward_with_grads"):
        return "held"
    if has_targets and need == (True, False, False, False):
        return "jacobian" if hasattr(backend, "forward_with_jacobians") else "recompute"
    return "recompute"


def _kl_order(c: Tensor | None, n: int) -> tuple[int, Tensor | None]:
    """(rows with a nonzero weight, a row order that puts them first; None = already first)."""
    if c is None:
        return n, None
    kl = c != 0
    n_kl = int(kl.sum())
    if bool(kl[:n_kl].all()):
        return n_kl, None
    return n_kl, torch.argsort((~kl).to(torch.int8), stable=True)


class _TokenStats(torch.autograd.Function):
    """(fkl, rkl, lp, lpr, per) per row; one Function serves both public ops and every plan."""

    @staticmethod
    def forward(ctx, h, hr, w, wr, tgt, c, lambda_, temperature, impl, budget):
        backend = _registry.module(impl)
        need = Needs(*ctx.needs_input_grad[:4]).possible(hr, wr)
        plan = _plan(backend, h, hr, need, tgt)
        ctx.pre, res = None, None
        if plan == "held":
            cc = torch.ones(h.shape[0], device=h.device) if c is None else c
            cc = cc.to(acc_dtype(h))
            coef = RowGrads(lambda_ * cc, (1.0 - lambda_) * cc, None, None)
            res = backend.forward_with_grads(h, hr, w, wr, temperature, coef, need, budget)
            if res is not None:
                stats, ctx.pre = res[0], ("held", res[1])
        elif plan == "jacobian":
            n_kl, order = _kl_order(c, h.shape[0])
            hh, hrr = (h, hr) if order is None else (h[order], None if hr is None else hr[order])
            res = backend.forward_with_jacobians(hh, hrr, w, wr, temperature, n_kl, budget)
            if res is not None:
                stats, jac = res
                if order is not None:  # back to the caller's row order
                    inv = torch.argsort(order)
                    stats = RowStats(*(None if x is None else x[inv] for x in stats))
                    jac = jac._replace(lp=jac.lp[inv])
                kl_rows = order[:n_kl] if order is not None else None
                ctx.pre = ("jacobian", (jac, kl_rows))
        if res is None:
            if plan != "recompute":
                log.debug("impl %s declined plan %s (budget %d bytes)", impl, plan, budget)
            plan = "recompute"
            if h.shape[0]:
                stats = backend.forward(h, hr, w, wr, temperature)
            else:  # nothing selected: empty outputs that still connect to autograd
                z = h.new_zeros(0, dtype=acc_dtype(h))
                stats = RowStats(z, z, z, z)
        log.debug("token stats: impl %s, %d rows, plan %s", impl, h.shape[0], plan)
        lse, lser, fkl, rkl = stats
        inv_t = 1.0 / temperature
        valid = tgt >= 0
        zero = torch.zeros_like(lse)
        lp = torch.where(valid, _target_logit(h, w, tgt, valid, inv_t) - lse, zero)
        if hr is None:
            fkl, rkl, lpr, per = zero, zero.clone(), zero.clone(), zero.clone()
        else:
            wr_ = w if wr is None else wr
            lpr = torch.where(valid, _target_logit(hr, wr_, tgt, valid, inv_t) - lser, zero)
            per = mixed(fkl, rkl, c, lambda_)
        ctx.save_for_backward(h, hr, w, wr, tgt, c, lse, lser, fkl, rkl)
        ctx.temperature, ctx.impl, ctx.kl, ctx.lambda_ = temperature, impl, hr is not None, lambda_
        if hr is None:
            ctx.mark_non_differentiable(fkl, rkl, lpr, per)
        return fkl, rkl, lp, lpr, per

    @staticmethod
    def backward(ctx, g_fkl, g_rkl, g_lp, g_lpr, g_per):
        h, hr, w, wr, tgt, c, lse, lser, fkl, rkl = ctx.saved_tensors
        need = Needs(*ctx.needs_input_grad[:4])
        valid = tgt >= 0
        if not ctx.kl:
            g_fkl = g_rkl = g_lpr = g_per = None
        acc = lse.dtype
        g_fkl, g_rkl, g_lp, g_lpr, g_per = (
            None if g is None else g.to(acc) for g in (g_fkl, g_rkl, g_lp, g_lpr, g_per)
        )
        # Log-probs are constant 0 at rows without a target: their gradient is dropped.
        g_lp, g_lpr = (None if g is None else torch.where(valid, g, torch.zeros_like(g))
                       for g in (g_lp, g_lpr))  # fmt: skip
        onehot = (g_lp, g_lpr)  # whichever plan covers the rest, the one-hot rows come last
        # The forward-computed gradients serve one backward; a second one recomputes.
        pre, ctx.pre = ctx.pre, None
        stats = RowStats(lse, lser, fkl, rkl)
        parts = [None, None, None, None]
        if pre is not None and pre[0] == "held" and g_per is not None:
            scale = _uniform(g_per, c) if (need[2] or need[3]) else 1.0
            if scale is None:  # dW can only be scaled by one number: recompute it all
                pre = None
            else:
                grads = pre[1]
                parts = [
                    None if grads.dh is None else _scale_rows(grads.dh, g_per),
                    None if grads.dhr is None else _scale_rows(grads.dhr, g_per),
                    None if grads.dw is None else grads.dw.mul_(scale),
                    None if grads.dwr is None else grads.dwr.mul_(scale),
                ]
                g_per = None  # covered
        # Fold what is left of the loss rows' gradient into the per-row KL gradients.
        if g_per is not None:
            cc = g_per if c is None else g_per * c.to(acc)
            g_fkl = _add(g_fkl, ctx.lambda_ * cc)
            g_rkl = _add(g_rkl, (1.0 - ctx.lambda_) * cc)
        if pre is not None and pre[0] == "jacobian":
            jac, kl_rows = pre[1]
            zeros = torch.zeros_like(lse)
            dh = _scale_rows(jac.lp, zeros if g_lp is None else g_lp)
            if jac.fkl is not None and jac.fkl.shape[0]:
                idx = kl_rows
                if idx is None:
                    idx = torch.arange(jac.fkl.shape[0], device=h.device)
                gf, gr = ((zeros if g is None else g).index_select(0, idx) for g in (g_fkl, g_rkl))
                dh.index_add_(0, idx, _scale_rows(jac.fkl, gf).add_(_scale_rows(jac.rkl, gr)))
                # Covered at the KL rows; any other row's KL gradient is recomputed below.
                g_fkl, g_rkl = (None if g is None else g.index_fill(0, idx, 0.0)
                                for g in (g_fkl, g_rkl))  # fmt: skip
            parts[0] = dh
            g_lp = g_lpr = None  # covered (the reference side needs no gradient here)
        rest = _recompute(ctx.impl, ctx.temperature, h, hr, w, wr, stats,
                          [g_fkl, g_rkl, g_lp, g_lpr], need)  # fmt: skip
        dh, dhr, dw, dwr = (_add(a, b) for a, b in zip(parts, rest))
        if not need[0]:
            dh = None
        if not need[1]:
            dhr = None
        if need[0] and dh is None:
            dh = torch.zeros(h.shape, dtype=acc, device=h.device)
        if need[1] and hr is not None and dhr is None:
            dhr = torch.zeros(hr.shape, dtype=acc, device=hr.device)
        if need[2] and dw is None:
            dw = torch.zeros(w.shape, dtype=acc_dtype(w), device=w.device)
        if need[3] and dwr is None:
            dwr = torch.zeros(wr.shape, dtype=acc_dtype(wr), device=wr.device)
        _add_onehot(onehot, ctx.temperature, tgt, valid, h, hr, w, wr, (dh, dhr, dw, dwr))
        return (_cast(dh, h), _cast(dhr, hr), _cast(dw, w), _cast(dwr, wr), *([None] * 6))


def _add_onehot(gs, temperature, tgt, valid, h, hr, w, wr, grads) -> None:
    """The one-hot part of the log-prob gradients ``gs`` = (g_lp, g_lpr): d logp / dz =
    onehot(y) (- p, done by the backend or the forward-computed plan), into ``grads``."""
    inv_t = 1.0 / temperature
    shared = wr is None
    dh, dhr, dw, dwr = grads
    for g, hid, dhid, weight, dweight in (
        (gs[0], h, dh, w, dw),
        (gs[1], hr, dhr, w if shared else wr, dw if shared else dwr),
    ):
        if g is None or hid is None:
            continue
        idx = (valid & (g != 0)).nonzero().squeeze(-1)
        if not idx.numel():
            continue
        y, gy = tgt.index_select(0, idx), g.index_select(0, idx).unsqueeze(-1) * inv_t
        if dhid is not None:
            dhid.index_add_(0, idx, gy * weight.index_select(0, y).to(gy.dtype))
        if dweight is not None:
            dweight.index_add_(0, y, gy * hid.index_select(0, idx).to(gy.dtype))


def _uniform(s: Tensor, c: Tensor | None):
    """The one value of ``s`` over the weighted rows (0-d tensor), or None if it varies."""
    vals = s if c is None else s[c != 0]
    if vals.numel() == 0:
        return 0.0
    return vals[0] if bool((vals == vals[0]).all()) else None


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a.add_(b)


def _scale_rows(x: Tensor, g: Tensor) -> Tensor:
    """x[i] *= g[i] in place; rows with g[i] == 0 become exactly 0 (as a skipped row would)."""
    return x.mul_(g.unsqueeze(-1)).masked_fill_((g == 0).unsqueeze(-1), 0.0)


def _recompute(impl, temperature, h, hr, w, wr, stats: RowStats, gs: list, need: Needs) -> list:
    """The backend's backward for the rows whose incoming gradients are not all zero; full-row
    fp32 gradients, None where not needed or nothing arrived."""
    live = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    for g in gs:
        if g is not None:
            live |= g != 0
    rows = live.nonzero().squeeze(-1)
    if not rows.numel():
        return [None, None, None, None]
    sub = rows.numel() != h.shape[0]

    def take(x):
        return None if x is None else (x.index_select(0, rows) if sub else x)

    dh, dhr, dw, dwr = _registry.module(impl).backward(
        take(h), take(hr), w, wr, temperature, RowStats(*(take(x) for x in stats)),
        RowGrads(*(take(g) for g in gs)), need,
    )  # fmt: skip
    return [
        _scatter(dh, rows, h) if need[0] else None,
        _scatter(dhr, rows, hr) if need[1] else None,
        dw,
        dwr,
    ]


def _scatter(part: Tensor | None, rows: Tensor, like: Tensor) -> Tensor:
    if part is not None and part.shape[0] == like.shape[0]:
        return part
    out = torch.zeros(like.shape, dtype=acc_dtype(like), device=like.device)
    if part is not None:
        out.index_copy_(0, rows, part)
    return out


def _cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if g is None or like is None else g.to(like.dtype)
