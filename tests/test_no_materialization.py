"""No impl but the reference ever creates a (rows x vocabulary) tensor.

A TorchDispatchMode sees every tensor that any torch op produces during forward and backward;
the largest one (in bytes: the Triton interpreter moves raw storages) must stay well below an
N x V float32 tensor (the chunked impl works on c x V blocks).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fgpo_kernels as fk
from fgpo_kernels import _registry


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _largest(impl, n, d, v, monkeypatch, targets=True, hr_grad=True):
    # Small chunk budgets, so that a chunk is far below N x V at this small size (the held
    # plan of docs/design.md §3.8: 8 rows' logits of both models).
    monkeypatch.setenv("FGPO_TORCH_CHUNK_ELEMS", str(8 * v))
    monkeypatch.setenv("FGPO_TRITON_GBLOCK_ELEMS", str(8 * v))
    monkeypatch.setenv("FGPO_TILE_BUDGET_MB", str(8 * v * 8 / 2**20))
    h = torch.randn(n, d, requires_grad=True)
    hr = torch.randn(n, d, requires_grad=hr_grad)
    w = (torch.randn(v, d) / d**0.5).requires_grad_(hr_grad)
    t = torch.randint(0, v, (n,)) if targets else None
    with _LargestTensor() as mode:
        out = fk.token_kl(h, hr, w, targets=t, impl=impl)
        total = out.loss + (out.policy_logps.sum() + out.ref_logps.sum() if targets else 0)
        total.backward()
    return mode.largest


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("plan", ["recompute", "held", "jacobian"])
def test_no_rows_by_vocab_tensor(impl, plan, monkeypatch):
    if not _registry._usable_on(impl, torch.device("cpu"))[0]:
        pytest.skip(f"{impl} unavailable")
    n, d, v = 96, 16, 6000
    # held: no targets; jacobian: targets and a frozen head (Triton declines both over budget)
    largest = _largest(impl, n, d, v, monkeypatch, targets=plan != "held",
                       hr_grad=plan != "jacobian")  # fmt: skip
    # The weight and its gradient are V x D floats; nothing may approach N x V.
    assert largest <= 4 * max(v * d, n * v // 4), (largest, 4 * n * v)


def test_reference_does_materialize(monkeypatch):
    # The check above can fail: the materialized definition trips it.
    n, d, v = 96, 16, 6000
    assert _largest("reference", n, d, v, monkeypatch) >= 4 * n * v
