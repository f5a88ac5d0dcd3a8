"""impl "cuda" on a real GPU: correctness against float64 (docs/design.md §4), dispatch, compile.

Skips as a whole without a CUDA device or without the built extension. Run on a GPU machine:
    pip install --no-deps --no-build-isolation -e . && python -m pytest tests/test_cuda_gpu.py
(``benchmarks/gpu_cuda_check.py`` adds timings against the Triton impl.)
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

import fgpo_kernels as fk
from fgpo_kernels import cuda_kl, torch_impl
from fgpo_kernels._backend import Needs, RowGrads, RowStats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def _available():
    st = fk.backend_status()["cuda"]
    if not st["built"]:
        pytest.skip(f"fgpo_kernels._C not built: {st['reason']}")
    assert st["available"], f"impl 'cuda' unavailable on this GPU: {st['reason']}"


@pytest.fixture(autouse=True)
def _cuda_backward_kernel(monkeypatch):
    """These tests are about the CUDA kernels: run its backward kernel, not the default
    (impl 'triton''s gblock backward, design §3.4)."""
    monkeypatch.setenv("FGPO_CUDA_BWD", "cuda")


def _inputs(mode, n, d, dr, v, dtype, seed, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    kl = mode != "logprob"
    h = rnd(n, d) * scale
    hr = (h + 0.3 * rnd(n, d) if mode == "shared" else rnd(n, dr) * scale) if kl else None
    w = rnd(v, d) * (3 / math.sqrt(d))
    wr = rnd(v, dr) * (3 / math.sqrt(dr)) if mode == "separate" else None
    gs = [rnd(n) if (kl or k == 2) else None for k in range(4)]
    cast = lambda x, dt: None if x is None else x.to("cuda", dt)
    low = [cast(x, dtype) for x in (h, hr, w, wr)]
    exact = [cast(x, torch.float64) for x in low]  # the same rounded values, in float64
    return low, exact, RowGrads(*(cast(x, torch.float32) for x in gs))


def _materialized(low, temperature):
    """Forward stats of the materialized path in the low dtype (PyTorch's own error)."""
    h, hr, w, wr = low
    z = (h @ w.T).float() / temperature
    lse = torch.logsumexp(z, -1)
    if hr is None:
        return lse, None, None, None
    zr = (hr @ (w if wr is None else wr).T).float() / temperature
    lser = torch.logsumexp(zr, -1)
    logp, logr = z - lse[:, None], zr - lser[:, None]
    d = logp - logr
    return lse, lser, -(logr.exp() * d).sum(-1), (logp.exp() * d).sum(-1)


CASES = [
    ("shared", 300, 256, 256, 32003, 0),
    ("shared", 70, 72, 72, 301, 3),
    ("separate", 131, 40, 56, 1003, 0),
    ("separate", 5, 45, 19, 65, 1),  # D % 8 != 0 -> padded
    ("logprob", 1000, 128, 128, 5001, 0),
    ("shared", 256, 1024, 1024, 152064, 0),  # few rows, Qwen2.5-VL-sized vocabulary
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,n,d,dr,v,splits", CASES)
def test_forward_backward_vs_float64(mode, n, d, dr, v, splits, dtype):
    low, exact, gs = _inputs(mode, n, d, dr, v, dtype, seed=n + v + d)
    t = 0.9
    kl, sep = mode != "logprob", mode == "separate"
    got = cuda_kl.forward(*low, t, splits=splits)
    ref = torch_impl.forward(*exact, t)
    base = _materialized(low, t)
    for name, a, b, c in zip(("lse", "lser", "fkl", "rkl"), got, ref, base):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite"
        e, e0 = rel_err(a, b), rel_err(c, b)
        assert e <= 2 * e0 + 1e-5, f"{mode}/{dtype} {name}: {e:.2e} vs materialized {e0:.2e}"
    need = Needs(True, kl, True, sep)
    ref32 = RowStats(*(None if x is None else x.float() for x in ref))
    got_b = cuda_kl.backward(*low, t, ref32, gs, need)
    gs64 = RowGrads(*(None if x is None else x.double() for x in gs))
    ref_b = torch_impl.backward(*exact, t, ref, gs64, need)
    for name, a, b in zip(("dh", "dhr", "dw", "dwr"), got_b, ref_b):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        # G is rounded to the input dtype before the backward products, as in the materialized
        # path; its error is about one rounding of the dtype.
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        assert rel_err(a, b) <= tol, f"{mode}/{dtype} {name}: {rel_err(a, b):.2e}"


def test_splits_do_not_change_the_result():
    low, _, _ = _inputs("shared", 200, 128, 128, 20011, torch.bfloat16, seed=3)
    outs = [cuda_kl.forward(*low, 1.0, splits=s) for s in (1, 7, 313)]
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_lora_backward_equals_full(mode):
    """need_w False takes the double-buffered W-chunk path; it must match the full backward."""
    sep = mode == "separate"
    low, _, gs = _inputs(mode, 300, 520, 264, 3001, torch.bfloat16, seed=8)
    st = cuda_kl.forward(*low, 1.0)
    full = cuda_kl.backward(*low, 1.0, st, gs, Needs(True, True, True, sep))
    lora = cuda_kl.backward(*low, 1.0, st, gs, Needs(True, True, False, False))
    assert lora[2] is None and lora[3] is None
    assert rel_err(lora[0], full[0]) < 1e-5 and rel_err(lora[1], full[1]) < 1e-5


def test_backward_atomics_repeatable():
    low, _, gs = _inputs("shared", 256, 256, 256, 4099, torch.bfloat16, seed=4)
    st = cuda_kl.forward(*low, 1.0)
    need = Needs(True, True, True, False)
    a = cuda_kl.backward(*low, 1.0, st, gs, need)
    b = cuda_kl.backward(*low, 1.0, st, gs, need)
    for x, y in zip(a, b):
        if x is not None:
            assert rel_err(x, y) < 1e-5  # fp32 atomics: only the summation order differs


def test_public_api_low_precision_and_compile():
    n, d, v = 97, 64, 3001
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    hr = (h.float() + 0.3 * torch.randn_like(h, dtype=torch.float32)).bfloat16()
    w = (torch.randn(v, d, device="cuda") / 8 * 3).bfloat16()
    tgt = torch.randint(0, v, (n,), device="cuda")
    mask = (torch.rand(n, device="cuda") < 0.7).float()

    def f(h, hr, w):
        o = fk.token_kl(h, hr, w, mask=mask, targets=tgt, impl="cuda")
        return o.loss + 0.1 * o.policy_logps.sum()

    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    eager = f(hh, hr, ww)
    eager.backward()
    g_eager = (hh.grad.clone(), ww.grad.clone())
    hh.grad = ww.grad = None
    compiled = torch.compile(f, fullgraph=False)(hh, hr, ww)
    compiled.backward()
    assert rel_err(compiled.detach(), eager.detach()) < 1e-5
    assert rel_err(hh.grad, g_eager[0]) < 1e-3 and rel_err(ww.grad, g_eager[1]) < 1e-3


def test_auto_dispatch_prefers_triton_and_fp32_is_delegated(monkeypatch):
    from fgpo_kernels import _registry

    # design §3.4: triton first on CUDA (forward predicted faster), then cuda; cuda's default
    # backward is triton's gblock, named in its status.
    want = "triton" if _registry.status("triton")["available"] else "cuda"
    assert _registry.resolve(None, torch.device("cuda")) == want
    monkeypatch.delenv("FGPO_CUDA_BWD")
    assert "gblock" in cuda_kl._bwd_note() or want == "cuda"
    low, exact, _ = _inputs("shared", 33, 48, 48, 517, torch.float32, seed=9)
    got = cuda_kl.forward(*low, 1.0)
    ref = torch_impl.forward(*exact, 1.0)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 2e-5  # fp32 goes to triton/torch: full fp32 accuracy


def test_nan_propagates_and_other_stream():
    low, _, _ = _inputs("shared", 40, 64, 64, 700, torch.bfloat16, seed=11)
    low[0][3, 5] = float("nan")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        lse, _, fkl, rkl = cuda_kl.forward(*low, 1.0)
    s.synchronize()
    assert torch.isnan(lse[3]) and torch.isnan(fkl[3]) and torch.isnan(rkl[3])
    keep = torch.ones(40, dtype=torch.bool, device="cuda")
    keep[3] = False
    assert torch.isfinite(lse[keep]).all() and torch.isfinite(fkl[keep]).all()
