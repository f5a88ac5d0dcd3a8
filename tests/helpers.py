"""Shared test helpers: norm-relative error and a dict-of-tensors comparison that says where.

Tests import them as ``from helpers import compare, rel_err`` (pytest puts ``tests/`` on
``sys.path``); ``conftest.py`` keeps only fixtures and the interpreter set-up.
"""

from __future__ import annotations

import torch


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
