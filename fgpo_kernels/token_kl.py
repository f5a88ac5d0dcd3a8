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
(``_backend.py`` is the contract) through one autograd Function (``_autograd.py``, which also
decides whether gradients are computed in the forward). ``impl="reference"`` materializes the
logits: the definition.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _autograd, _registry, reference
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


def _stats(h, hr, w, wr, tgt, c, lambda_, temperature, impl, budget):
    """Per-row (fkl, rkl, logp, logp_ref, per) for the selected rows, via the chosen impl;
    ``per`` = c (λ fkl + (1 − λ) rkl) is the rows' share of the loss (``_autograd``)."""
    if impl == "reference":
        fkl, rkl, lp, lpr = reference.token_stats(h, hr, w, wr, tgt, temperature)
        per = None if hr is None else _autograd.mixed(fkl, rkl, c, lambda_)
        return fkl, rkl, lp, lpr, per
    args = (h, hr, w, wr, tgt, c, lambda_, temperature, impl, budget)
    if any(x is not None and x.requires_grad for x in (h, hr, w, wr)):
        return _autograd._TokenStats.apply(*args)
    with torch.no_grad():
        return _autograd._TokenStats.forward(_NoCtx(), *args)


class _NoCtx:
    """Stands in for autograd's ctx when nothing requires grad (no tensors are kept)."""

    needs_input_grad = (False,) * 10

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
    tile_budget_mb: float | None = None,
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
        tile_budget_mb: MB of logits the op may keep between its statistics and its gradients
            when it computes the gradients in the forward (docs/design.md §3.8); None =
            ``FGPO_TILE_BUDGET_MB`` or the device's default (32 on a CPU, 1024 on a GPU).

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
    budget = _autograd.tile_budget(tile_budget_mb, h.device)
    n = h.shape[0]
    active = None
    if m is not None:
        active = m != 0
        if tgt is not None:
            active = active | (tgt >= 0)
    m_sel = None if m is None else m.detach()
    rows, (h, hr, tgt_sel, m_sel) = _select_rows(active, h, hr, tgt, m_sel)
    tgt_rows = (
        tgt_sel
        if tgt_sel is not None
        else torch.full((h.shape[0],), -1, dtype=torch.long, device=h.device)
    )
    outs = _stats(h, hr, w, wr, tgt_rows, m_sel, lambda_, temperature, name, budget)
    fkl, rkl, lp, lpr, per = (_expand(x, rows, n, policy_hidden) for x in outs)
    if m is None:
        denom = torch.tensor(float(n), device=per.device, dtype=per.dtype)
    else:
        denom = m.to(per.dtype).sum()
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
    lp = _stats(h, None, w, None, tgt, None, 0.0, temperature, name, 0)[2]
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
