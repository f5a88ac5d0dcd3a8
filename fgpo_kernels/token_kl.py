"""Fused token-wise KL (both directions) and token log-probs from hidden states.

Math (row i = one position; hidden row i predicts ``targets[i]``; T = temperature):

    z  = h  W^T / T,   p = softmax(z)        zr = hr Wr^T / T,   r = softmax(zr)
    fkl_i = KL(r || p) = sum_j r_j (log r_j - log p_j)          ("forward": ref -> policy)
    rkl_i = KL(p || r) = sum_j p_j (log p_j - log r_j)          ("reverse": policy -> ref)
    logp_i = log p_{y_i}  (0 where y_i == ignore_index)
    loss   = reduce( mask_i * (lambda * fkl_i + (1 - lambda) * rkl_i) )

Gradients w.r.t. the policy logits: dfkl/dz = p - r, drkl/dz = p (d - rkl), dlogp/dz = onehot - p
(d = log p - log r); w.r.t. the reference logits: dfkl/dzr = r (-d - fkl), drkl/dzr = r - p,
dlogr/dzr = onehot - r. Chain rule: dh = G W / T, dW = G^T h / T.

The public functions validate input, flatten the leading dimensions into rows, drop rows that
need no work (mask 0 and no target) before any matmul, and hand the dense work to an impl
(``_backend.py`` is the contract). ``impl="reference"`` materializes the logits: the definition.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _registry, reference
from ._backend import Needs, RowGrads, RowStats
from ._util import acc_dtype, check_fraction, check_real
from ._validate import check_token_inputs

_REDUCTIONS = ("sum", "mean", "none")
# Target id meaning "no target at this position" (the default ``ignore_index`` everywhere).
IGNORE_INDEX = -100
# Logits are divided by the temperature and the gradients again: below this, ordinary hidden
# states (logits up to ~1e3) already overflow float32 in the backward (|dh| ~ |z| |W| / T^2),
# and from ~1e-37 on in the forward; no use of a softmax temperature comes near it.
MIN_TEMPERATURE = 1e-6


class TokenKLOutput(NamedTuple):
    loss: Tensor
    forward_kl: Tensor
    reverse_kl: Tensor
    policy_logps: Tensor | None
    ref_logps: Tensor | None


def _target_logit(h: Tensor, w: Tensor, tgt: Tensor, valid: Tensor, inv_t: float) -> Tensor:
    """z_y per row in fp32 (a gather and a row-wise dot: N x D work, no N x V)."""
    rows = w.index_select(0, tgt.clamp(min=0))
    acc = acc_dtype(h)
    zy = torch.linalg.vecdot(h.to(acc), rows.to(acc)) * inv_t
    return torch.where(valid, zy, torch.zeros_like(zy))


class _TokenStats(torch.autograd.Function):
    """(fkl, rkl, logp, logp_ref) per row; one Function serves both public ops."""

    @staticmethod
    def forward(ctx, h, hr, w, wr, tgt, temperature, impl):
        backend = _registry.module(impl)
        inv_t = 1.0 / temperature
        if h.shape[0]:
            lse, lser, fkl, rkl = backend.forward(h, hr, w, wr, temperature)
        else:  # nothing selected: empty outputs that still connect to autograd (zero grads)
            lse = lser = fkl = rkl = h.new_zeros(0, dtype=acc_dtype(h))
        wr_ = w if wr is None else wr
        valid = tgt >= 0
        zero = torch.zeros_like(lse)
        lp = torch.where(valid, _target_logit(h, w, tgt, valid, inv_t) - lse, zero)
        if hr is None:
            fkl, rkl, lpr = zero, zero.clone(), zero.clone()
        else:
            lpr = torch.where(valid, _target_logit(hr, wr_, tgt, valid, inv_t) - lser, zero)
        ctx.save_for_backward(h, hr, w, wr, tgt, lse, lser, fkl, rkl)
        ctx.temperature, ctx.impl, ctx.kl = temperature, impl, hr is not None
        if hr is None:
            ctx.mark_non_differentiable(fkl, rkl, lpr)
        return fkl, rkl, lp, lpr

    @staticmethod
    def backward(ctx, g_fkl, g_rkl, g_lp, g_lpr):
        h, hr, w, wr, tgt, lse, lser, fkl, rkl = ctx.saved_tensors
        need_h, need_hr, need_w, need_wr = ctx.needs_input_grad[:4]
        inv_t = 1.0 / ctx.temperature
        valid = tgt >= 0
        if not ctx.kl:
            g_fkl = g_rkl = g_lpr = None
        gs = [None if g is None else g.to(lse.dtype) for g in (g_fkl, g_rkl, g_lp, g_lpr)]
        # Log-probs are constant 0 at rows without a target: their gradient is dropped.
        for k in (2, 3):
            if gs[k] is not None:
                gs[k] = torch.where(valid, gs[k], torch.zeros_like(gs[k]))
        # Rows whose incoming gradients are all zero contribute nothing: skip them.
        live = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        for g in gs:
            if g is not None:
                live |= g != 0
        rows = live.nonzero().squeeze(-1)
        sub = rows.numel() != h.shape[0]

        def take(x):
            return None if x is None else (x.index_select(0, rows) if sub else x)

        shared = wr is None
        dh = dhr = dw = dwr = None
        if rows.numel():
            stats = RowStats(*(take(x) for x in (lse, lser, fkl, rkl)))
            grads = RowGrads(*(take(g) for g in gs))
            need = Needs(need_h, need_hr, need_w, need_wr)
            dh, dhr, dw, dwr = _registry.module(ctx.impl).backward(
                take(h), take(hr), w, wr, ctx.temperature, stats, grads, need
            )
        dh = _scatter(dh, rows, h) if need_h else None
        dhr = _scatter(dhr, rows, hr) if need_hr else None
        if need_w and dw is None:
            dw = torch.zeros(w.shape, dtype=acc_dtype(w), device=w.device)
        if need_wr and dwr is None:
            dwr = torch.zeros(wr.shape, dtype=acc_dtype(wr), device=wr.device)
        # One-hot part of the log-prob gradients: d logp / dz = onehot(y) (- p, done above).
        for g, hid, dhid, weight, dweight in (
            (gs[2], h, dh, w, dw),
            (gs[3], hr, dhr, w if shared else wr, dw if shared else dwr),
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
        return (
            _cast(dh, h),
            _cast(dhr, hr),
            _cast(dw, w),
            _cast(dwr, wr),
            None,
            None,
            None,
        )


def _scatter(part: Tensor | None, rows: Tensor, like: Tensor) -> Tensor:
    if part is not None and part.shape[0] == like.shape[0]:
        return part
    out = torch.zeros(like.shape, dtype=acc_dtype(like), device=like.device)
    if part is not None:
        out.index_copy_(0, rows, part)
    return out


def _cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if g is None or like is None else g.to(like.dtype)


def _stats(h, hr, w, wr, tgt, temperature, impl):
    """Per-row (fkl, rkl, logp, logp_ref) for the selected rows, via the chosen impl."""
    if impl == "reference":
        fkl, rkl, lp, lpr = reference.token_stats(h, hr, w, wr, tgt, temperature)
        return fkl, rkl, lp, lpr
    if (
        h.requires_grad
        or (hr is not None and hr.requires_grad)
        or w.requires_grad
        or (wr is not None and wr.requires_grad)
    ):
        return _TokenStats.apply(h, hr, w, wr, tgt, temperature, impl)
    with torch.no_grad():
        return _TokenStats.forward(_NoCtx(), h, hr, w, wr, tgt, temperature, impl)


class _NoCtx:
    """Stands in for autograd's ctx when nothing requires grad (no tensors are kept)."""

    def save_for_backward(self, *args):
        pass

    def mark_non_differentiable(self, *args):
        pass


def _select_rows(active: Tensor | None, *xs: Tensor | None):
    """(row indices or None when every row is active, each x restricted to the active rows)."""
    if active is None or bool(active.all()):
        return None, xs
    rows = active.nonzero().squeeze(-1)
    return rows, tuple(None if x is None else x.index_select(0, rows) for x in xs)


def _expand(vals: Tensor | None, rows: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Rows computed for the selected positions, zeros elsewhere, as fp32 (n,)."""
    if vals is None:
        return torch.zeros(n, dtype=acc_dtype(like), device=like.device)
    if rows is None:
        return vals
    return torch.zeros(n, dtype=vals.dtype, device=like.device).index_put((rows,), vals)


def token_kl(
    policy_hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    ref_weight: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    lambda_: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
    impl: str | None = None,
) -> TokenKLOutput:
    """Bidirectional token-wise KL between policy and reference, straight from hidden states.

    Args:
        policy_hidden: ``(..., D)`` policy hidden states (fp32/bf16/fp16); row i predicts
            ``targets[i]`` (already shifted).
        ref_hidden: ``(..., D_ref)`` reference hidden states, same leading shape.
        weight: ``(V, D)`` LM-head weight of the policy.
        ref_weight: ``(V, D_ref)`` LM-head weight of the reference; None shares ``weight``.
        mask: ``(...)`` per-position weights (0/1 or any real); None = all ones. Positions
            with mask 0 and no target are not computed at all (their KL values read 0).
        targets: ``(...)`` integer token ids in ``[0, V)`` or ``ignore_index``; when given,
            ``policy_logps``/``ref_logps`` are returned and are differentiable.
        lambda_: weight in [0, 1] of the forward KL(ref || policy); the reverse gets
            ``1 - lambda_``.
        temperature: logits are divided by it (``>= MIN_TEMPERATURE``).
        reduction: ``"sum"``, ``"mean"`` (sum / sum of mask) or ``"none"``.
        impl: ``"torch"``, ``"triton"``, ``"cuda"``, ``"reference"`` or None (best available;
            ``FGPO_IMPL`` overrides None).

    Returns:
        ``TokenKLOutput(loss, forward_kl, reverse_kl, policy_logps, ref_logps)``; per-position
        values have shape ``(...)`` and dtype float32 (float64 for float64 inputs).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_fraction("lambda_", lambda_)
    _check_temperature(temperature)
    lead, h, hr, w, wr, tgt, m = check_token_inputs(
        policy_hidden, ref_hidden, weight, ref_weight, mask, targets, ignore_index
    )
    name = _registry.resolve(impl, h.device)
    n = h.shape[0]
    active = None
    if m is not None:
        active = m != 0
        if tgt is not None:
            active = active | (tgt >= 0)
    rows, (h, hr, tgt_sel) = _select_rows(active, h, hr, tgt)
    tgt_rows = (
        tgt_sel
        if tgt_sel is not None
        else torch.full((h.shape[0],), -1, dtype=torch.long, device=h.device)
    )
    fkl, rkl, lp, lpr = _stats(h, hr, w, wr, tgt_rows, temperature, name)
    fkl, rkl, lp, lpr = (_expand(x, rows, n, policy_hidden) for x in (fkl, rkl, lp, lpr))
    mixed = lambda_ * fkl + (1.0 - lambda_) * rkl
    if m is None:
        per = mixed
        denom = torch.tensor(float(n), device=per.device, dtype=per.dtype)
    else:
        mw = m.to(mixed.dtype)
        per = torch.where(mw != 0, mw * mixed, torch.zeros_like(mixed))
        denom = mw.sum()
    if reduction == "none":
        loss = per.reshape(lead)
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / torch.where(denom == 0, torch.ones_like(denom), denom)
    has_t = targets is not None
    return TokenKLOutput(
        loss,
        fkl.reshape(lead),
        rkl.reshape(lead),
        lp.reshape(lead) if has_t else None,
        lpr.reshape(lead) if has_t else None,
    )


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    impl: str | None = None,
) -> Tensor:
    """``log softmax(hidden @ weight.T / T)[targets]`` per position, without N x V logits.

    ``hidden (..., D)``, ``weight (V, D)``, ``targets (...)``; returns ``(...)`` float32
    (float64 for float64 input), 0 where ``targets == ignore_index``. Differentiable w.r.t.
    ``hidden`` and ``weight``.
    """
    if targets is None:
        raise TypeError("targets must be an integer tensor, got None")
    _check_temperature(temperature)
    lead, h, _, w, _, tgt, _ = check_token_inputs(
        hidden, None, weight, None, None, targets, ignore_index
    )
    name = _registry.resolve(impl, h.device)
    n = h.shape[0]
    rows, (h, tgt) = _select_rows(tgt >= 0, h, tgt)
    lp = _stats(h, None, w, None, tgt, temperature, name)[2]
    return _expand(lp, rows, n, hidden).reshape(lead)


def _check_temperature(temperature) -> None:
    check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE} (logits and gradients are divided by "
            f"it; smaller values overflow float32 into inf/NaN), got {temperature}"
        )
