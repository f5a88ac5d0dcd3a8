"""Dispatch as a user sees it: which impl a call runs, and why the others are unavailable."""

from __future__ import annotations

import pytest
import torch

import fgpo_kernels as fk
from fgpo_kernels import _registry


def test_resolve_impl_names_what_a_call_runs(monkeypatch):
    monkeypatch.delenv("FGPO_IMPL", raising=False)
    assert fk.resolve_impl(None, "cpu") == "torch"  # CPU tensors: the chunked PyTorch impl
    assert fk.resolve_impl("reference", "cpu") == "reference"
    monkeypatch.setenv("FGPO_IMPL", "triton")  # the interpreter is on in the tests
    if _registry.status("triton")["available"]:
        assert fk.resolve_impl(None, "cpu") == "triton"
    else:  # e.g. triton 3.6's interpreter under numpy 2: named, not silently replaced
        with pytest.raises(RuntimeError, match=r"impl 'triton' is unavailable: .+"):
            fk.resolve_impl(None, "cpu")
    assert fk.resolve_impl("torch", "cpu") == "torch"  # an explicit impl wins over FGPO_IMPL
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="impl 'cuda' is unavailable"):
            fk.resolve_impl("cuda", "cpu")


def test_fgpo_example_names_the_impl_it_runs(capsys):
    from fgpo.cli import main

    assert main(["example", "--rows", "33", "--hidden", "16", "--vocab", "101"]) == 0
    out = capsys.readouterr().out
    assert "impl: torch, chosen automatically" in out
    assert "impl=torch" in out and "impl=reference" in out


def test_cuda_impl_backward_defaults_to_triton_gblock(monkeypatch):
    """impl "cuda" hands its backward to triton's gblock (impl "torch"'s without a usable Triton)
    unless FGPO_CUDA_BWD=cuda asks for the CUDA kernel (design §3.4); the choice is checked and
    named in the probe's reason. Runs on
    CPU: the Triton interpreter takes the default path, the CUDA op is replaced by a recorder."""
    from fgpo_kernels import cuda_kl
    from fgpo_kernels._backend import Needs, RowGrads

    if not _registry.status("triton")["available"]:
        pytest.skip("impl 'triton' is unavailable here")
    tri = _registry.module("triton")
    gen = torch.Generator().manual_seed(0)
    n, d, v = 9, 16, 70
    h, hr = (torch.randn(n, d, generator=gen).bfloat16() for _ in "ab")
    w = (torch.randn(v, d, generator=gen) / 4).bfloat16()
    stats = tri.forward(h, hr, w, None, 1.0)
    grads = RowGrads(*(torch.randn(n, generator=gen) for _ in range(4)))
    need = Needs(True, True, True, False)
    calls = []
    real = tri.backward
    monkeypatch.setattr(tri, "backward", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(cuda_kl, "_bwd_op", lambda *a: calls.append("cuda kernel") or (None,) * 4)

    monkeypatch.delenv("FGPO_CUDA_BWD", raising=False)
    got = cuda_kl.backward(h, hr, w, None, 1.0, stats, grads, need)
    assert calls == [{"mode": "gblock"}]
    want = real(h, hr, w, None, 1.0, stats, grads, need, mode="gblock")
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
    assert "impl 'triton' gblock" in cuda_kl._bwd_note()

    calls.clear()
    monkeypatch.setenv("FGPO_CUDA_BWD", "cuda")
    cuda_kl.backward(h, hr, w, None, 1.0, stats, grads, need)
    assert calls == ["cuda kernel"]
    assert "the CUDA kernel (FGPO_CUDA_BWD=cuda)" in cuda_kl._bwd_note()
    calls.clear()
    monkeypatch.delenv("FGPO_CUDA_BWD")
    cuda_kl.backward(h, hr, w, None, 1.0, stats, grads, need, bwd="cuda")  # the argument
    assert calls == ["cuda kernel"]

    monkeypatch.setenv("FGPO_CUDA_BWD", "atomics")
    with pytest.raises(ValueError, match="FGPO_CUDA_BWD must be one of"):
        cuda_kl.backward(h, hr, w, None, 1.0, stats, grads, need)

    # Without a usable Triton the default is impl "torch"'s chunked backward, never the CUDA
    # kernel (it runs only when asked for).
    calls.clear()
    monkeypatch.delenv("FGPO_CUDA_BWD")
    monkeypatch.setattr(cuda_kl, "_triton_backward", lambda: None)
    torch_mod = _registry.module("torch")
    real_torch = torch_mod.backward
    monkeypatch.setattr(torch_mod, "backward",
                        lambda *a, **k: calls.append("torch") or real_torch(*a, **k))  # fmt: skip
    got = cuda_kl.backward(h, hr, w, None, 1.0, stats, grads, need)
    assert calls == ["torch"], calls
    want = real_torch(h, hr, w, None, 1.0, stats, grads, need)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
    assert "impl 'torch' chunked" in cuda_kl._bwd_note()
