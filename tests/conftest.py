"""Test set-up: Triton's interpreter on machines without a GPU, seeding, shared helpers."""

from __future__ import annotations

import os
import zlib

import torch

# Must happen before anything imports triton. On a GPU machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import triton_interp_patch  # bf16 tl.dot in the CPU interpreter (test-only fix)

    triton_interp_patch.install()

import pytest

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed(request):
    # A reproducible seed per test, derived from its id (so inputs differ across tests);
    # FGPO_TEST_SEED=k draws another set of inputs for every test.
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("FGPO_TEST_SEED", "0"))
    torch.manual_seed(seed)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of a against b (b is the reference)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def compare(got: dict, ref: dict, vtol: float, gtol: float, label: str = "") -> None:
    """Every entry of ``ref`` against ``got``: same shape, finite, norm-relative error within
    ``gtol`` for gradients (keys starting with "d") and ``vtol`` for values."""
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, f"{label}{k}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{label}{k}: non-finite values"
        e = rel_err(g, r)
        tol = gtol if k.startswith("d") else vtol
        assert e <= tol, f"{label}{k}: rel err {e:.3e} > {tol:.1e}\n got {g}\n ref {r}"
