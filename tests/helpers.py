"""Shared test helpers: norm-relative error and a dict-of-tensors comparison that says where.

Tests import them as ``from helpers import compare, rel_err`` (pytest puts ``tests/`` on
``sys.path``); ``conftest.py`` keeps only fixtures and the interpreter set-up.
"""

from __future__ import annotations

import torch

import fgpo_kernels as fk


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of a against b (b is the reference)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def worst(got: torch.Tensor, ref: torch.Tensor) -> str:
    """Where ``got`` is furthest from ``ref`` (NaN/inf counts as furthest), e.g.
    ``worst at index (3, 17): got 0.1234 ref 0.125``."""
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    if g.numel() == 0:
        return "no elements"
    diff = torch.nan_to_num((g - r).abs(), nan=float("inf")).reshape(-1)
    flat = int(diff.argmax())
    a, b = g.reshape(-1)[flat].item(), r.reshape(-1)[flat].item()
    return f"worst at index {_index(flat, g.shape)}: got {a:.6g} ref {b:.6g}"


def compare(got: dict, ref: dict, vtol: float, gtol: float, label: str = "") -> None:
    """Every entry of ``ref`` against ``got``: same shape, finite, norm-relative error within
    ``gtol`` for gradients (keys starting with "d") and ``vtol`` for values. A failure names the
    entry, the error and the worst element."""
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, f"{label}{k}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        bad = ~torch.isfinite(g)
        if bool(bad.any()):
            first = _index(int(bad.reshape(-1).nonzero()[0]), g.shape)
            raise AssertionError(f"{label}{k}: non-finite values, first at index {first}")
        e = rel_err(g, r)
        tol = gtol if k.startswith("d") else vtol
        assert e <= tol, f"{label}{k}: rel err {e:.3e} > {tol:.1e}; {worst(g, r)}"


# ---- KL of nearly equal models at logits near 30 (tests/test_kl_numerics.py)

_KN, _KD, _KV = 37, 48, 1003


def kl_offset_case(seed: int, shared: bool):
    """(h, hr, w, wr) float64 whose values and logits are exact in fp32 and bf16 (entries k/64,
    |k| <= 65: 7 significant bits; partial sums of products are multiples of 2^-12 below 2^7);
    KL per row near 1e-4."""
    g = torch.Generator().manual_seed(seed)
    q = lambda *s: torch.randint(-64, 65, s, generator=g).double() / 64  # k / 64, |k| <= 64
    h, w = q(_KN, _KD), q(_KV, _KD)
    h[:, 0], w[:, 0] = 1.0, 30.0  # every logit + 30
    # The reference moves 3 coordinates of each row by 1/64: z - zr ~ 0.016, KL ~ 1e-4.
    hr = h.clone()
    cols = torch.stack([torch.randperm(_KD - 1, generator=g)[:3] + 1 for _ in range(_KN)])
    sign = torch.randint(0, 2, (_KN, 3), generator=g).double() * 2 - 1
    hr.scatter_add_(1, cols, sign / 64)
    wr = None
    if not shared:  # a separate head: the same one with a few entries moved by 1/64
        wr = w.clone()  # (not the offset column: 30 + 1/64 needs 11 bits, bf16 has 8)
        moved = torch.rand(_KV, _KD, generator=g) < 0.02
        moved[:, 0] = False
        wr[moved] += 1 / 64
    return h, hr, w, wr


def _kl_rows(impl: str, dtype: torch.dtype, args) -> tuple[torch.Tensor, torch.Tensor]:
    h, hr, w, wr = (None if x is None else x.to(dtype) for x in args)
    out = fk.token_kl(h, hr, w, wr, reduction="none", impl=impl)
    return out.forward_kl.double(), out.reverse_kl.double()


def kl_offset_errors(impl: str, dtype: torch.dtype, args) -> tuple[float, float, float, float]:
    """(fkl error, rkl error) of ``impl`` in ``dtype``, then those of the materialized fp32
    path, all norm-relative against the float64 definition."""
    ref = _kl_rows("reference", torch.float64, args)
    mat = _kl_rows("reference", torch.float32, args)
    got = _kl_rows(impl, dtype, args)
    # The case is what it claims: large logits, nearly equal models.
    assert 0.2e-4 < ref[1].mean().item() < 5e-4, ref[1].mean().item()
    return (*(rel_err(a, b) for a, b in zip(got, ref)), *(rel_err(a, b) for a, b in zip(mat, ref)))
