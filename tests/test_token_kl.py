"""token_kl / token_logprobs: every impl against the float64 materialized definition."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import compare, rel_err

import fgpo_kernels as fk
from fgpo_kernels import _registry


def _impls() -> list:
    out = []
    for name in ("torch", "triton", "cuda"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ok, why = _registry._usable_on(name, dev)
        marks = [] if ok else [pytest.mark.skip(reason=why)]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


IMPLS = _impls()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(
    lead=(37,),
    d=48,
    d_ref=None,
    v=1003,
    dtype=torch.float32,
    shared=True,
    mask="binary",
    ignore_frac=0.2,
    scale=1.0,
):
    """Random inputs; the reference hidden is a perturbation of the policy one (realistic KL)."""
    d_ref = d if shared else (d_ref or d + 8)
    h = torch.randn(*lead, d, dtype=torch.float64) * scale
    if shared:
        hr = h + 0.3 * torch.randn_like(h)
    else:
        hr = torch.randn(*lead, d_ref, dtype=torch.float64) * scale
    w = torch.randn(v, d, dtype=torch.float64) / math.sqrt(d) * 3
    wr = None if shared else torch.randn(v, d_ref, dtype=torch.float64) / math.sqrt(d_ref) * 3
    targets = torch.randint(0, v, lead)
    targets[torch.rand(lead) < ignore_frac] = -100
    if mask == "binary":
        m = (torch.rand(lead) < 0.6).to(torch.float64)
    elif mask == "weights":  # non-binary token weights (edited tokens 5, others 1, some 0)
        m = torch.where(torch.rand(lead) < 0.3, 5.0, 1.0).double() * (torch.rand(lead) < 0.8)
    elif mask == "zero":
        m = torch.zeros(lead, dtype=torch.float64)
    else:
        m = None
    cast = lambda x: None if x is None else x.to(dtype).to(DEV)
    return dict(
        h=cast(h),
        hr=cast(hr),
        w=cast(w),
        wr=cast(wr),
        targets=targets.to(DEV),
        mask=None if m is None else m.to(DEV),
    )


def run(
    case,
    impl,
    *,
    grads=("h", "w"),
    lambda_=0.5,
    temperature=1.0,
    reduction="sum",
    upcast=False,
    gcoef=(1.0, 0.7, -0.4),
):
    """Forward + backward of loss + a*sum(policy_logps) + b*sum(ref_logps); returns values and
    gradients (gradients of every input named in ``grads``)."""
    leaves = {}
    for k in ("h", "hr", "w", "wr"):
        x = case[k]
        if x is None:
            continue
        x = x.detach().clone()
        if upcast:
            x = x.double()
        if k in grads:
            x.requires_grad_(True)
        leaves[k] = x
    out = fk.token_kl(
        leaves["h"], leaves["hr"], leaves["w"], leaves.get("wr"), mask=case["mask"],
        targets=case["targets"], lambda_=lambda_, temperature=temperature,
        reduction=reduction, impl=impl,
    )  # fmt: skip
    a, b, c = gcoef
    total = a * (out.loss.sum() if reduction == "none" else out.loss)
    total = total + b * out.policy_logps.sum() + c * out.ref_logps.sum()
    if any(x.requires_grad for x in leaves.values()):
        total.backward()
    res = {
        "loss": out.loss.detach(),
        "fkl": out.forward_kl.detach(),
        "rkl": out.reverse_kl.detach(),
        "lp": out.policy_logps.detach(),
        "lpr": out.ref_logps.detach(),
    }
    for k, x in leaves.items():
        if x.requires_grad:
            res["d" + k] = x.grad
    return res


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "lead,d,v,shared,mask,grads,temperature,reduction",
    [
        ((37,), 48, 1003, True, "binary", ("h", "w"), 1.0, "sum"),
        ((3, 13), 40, 997, True, "weights", ("h", "hr", "w"), 0.7, "mean"),
        ((29,), 48, 515, False, "binary", ("h", "hr", "w", "wr"), 1.0, "none"),
        ((2, 11), 24, 1031, False, None, ("h",), 1.3, "sum"),
        ((17,), 64, 2053, True, "weights", ("h", "hr"), 1.0, "sum"),
    ],
)
def test_fp32_matches_reference(impl, lead, d, v, shared, mask, grads, temperature, reduction):
    case = make_case(lead=lead, d=d, v=v, shared=shared, mask=mask)
    lam = float(torch.rand(()))
    ref = run(case, "reference", grads=grads, lambda_=lam, temperature=temperature,
              reduction=reduction, upcast=True)  # fmt: skip
    got = run(case, impl, grads=grads, lambda_=lam, temperature=temperature, reduction=reduction)
    compare(got, ref, 2e-5, 1e-4, f"[{impl}] ")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_zero_mask_gives_exact_zeros(impl, reduction):
    case = make_case(lead=(5, 7), mask="zero", ignore_frac=1.0)
    got = run(case, impl, grads=("h", "hr", "w"), reduction=reduction, gcoef=(1.0, 0.0, 0.0))
    assert torch.equal(got["loss"], torch.zeros_like(got["loss"]))
    for k in ("dh", "dhr", "dw"):
        assert torch.equal(got[k], torch.zeros_like(got[k])), k


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_mask_with_targets_still_gives_logps(impl):
    case = make_case(lead=(23,), mask="zero", ignore_frac=0.3)
    ref = run(case, "reference", grads=("h", "w"), upcast=True)
    got = run(case, impl, grads=("h", "w"))
    assert float(got["loss"]) == 0.0
    compare({k: got[k] for k in ("lp", "lpr", "dh", "dw")},
            {k: ref[k] for k in ("lp", "lpr", "dh", "dw")}, 2e-5, 1e-4)  # fmt: skip


def _materialized_error(case, dtype, grads, **kw):
    """Error of the materialized PyTorch path run in ``dtype`` against float64."""
    ref = run(case, "reference", grads=grads, upcast=True, **kw)
    low = run(case, "reference", grads=grads, **kw)
    return ref, {k: rel_err(low[k], r) for k, r in ref.items()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("draw", range(3))  # several draws: a NaN once came from 2 seeds in 12
def test_low_precision_within_2x_of_pytorch(impl, dtype, draw):
    case = make_case(lead=(41,), d=64, v=1009, dtype=dtype, mask="weights")
    grads = ("h", "hr", "w")
    ref, base = _materialized_error(case, dtype, grads)
    got = run(case, impl, grads=grads)
    for k, r in ref.items():
        e = rel_err(got[k], r)
        assert math.isfinite(e)
        assert e <= 2 * base[k] + 1e-3, f"[{impl}/{dtype}] {k}: {e:.3e} vs pytorch {base[k]:.3e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_matches_reference(impl):
    n, d, v = 43, 56, 1013
    h = torch.randn(n, d, device=DEV)
    w = torch.randn(v, d, device=DEV) / d**0.5 * 3
    t = torch.randint(0, v, (n,), device=DEV)
    t[::5] = -7
    g = torch.randn(n, device=DEV)
    outs = {}
    for name, cast in (("reference", torch.float64), (impl, torch.float32)):
        hh, ww = h.to(cast).requires_grad_(), w.to(cast).requires_grad_()
        lp = fk.token_logprobs(hh, ww, t, ignore_index=-7, temperature=0.9, impl=name)
        (lp * g.to(lp.dtype)).sum().backward()
        outs[name] = (lp.detach(), hh.grad, ww.grad)
    (r, rh, rw), (o, oh, ow) = outs["reference"], outs[impl]
    assert o.dtype == torch.float32 and o.shape == (n,)
    assert torch.all(o[::5] == 0)
    assert rel_err(o, r) <= 2e-5
    assert rel_err(oh, rh) <= 1e-4 and rel_err(ow, rw) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(impl):
    case = make_case(lead=(9,), mask=None)
    case["h"][3, 5] = float("nan")
    got = run(case, impl, grads=())
    assert torch.isnan(got["loss"]).item()
    assert torch.isnan(got["fkl"][3]) and torch.isnan(got["rkl"][3])


def test_gradcheck_torch_impl_float64():
    case = make_case(lead=(6,), d=5, v=37, mask="weights", ignore_frac=0.3, shared=False)
    h, hr, w, wr = (case[k].double().requires_grad_() for k in ("h", "hr", "w", "wr"))

    def f(h, hr, w, wr):
        o = fk.token_kl(h, hr, w, wr, mask=case["mask"], targets=case["targets"], impl="torch",
                        lambda_=0.3, temperature=1.1)  # fmt: skip
        return o.loss, o.policy_logps, o.ref_logps, o.forward_kl, o.reverse_kl

    assert torch.autograd.gradcheck(f, (h, hr, w, wr))


def test_no_grad_and_detached_reference():
    case = make_case()
    with torch.no_grad():
        a = fk.token_kl(case["h"], case["hr"], case["w"], targets=case["targets"], impl="torch")
    b = fk.token_kl(case["h"], case["hr"], case["w"], targets=case["targets"], impl="torch")
    assert torch.equal(a.loss, b.loss) and not a.loss.requires_grad


# ---------------------------------------------------------------- dispatch and bad input


def test_backend_status_and_override(monkeypatch):
    st = fk.backend_status()
    assert set(st) == {"reference", "torch", "triton", "cuda"}
    for s in st.values():
        assert set(s) == {"available", "built", "reason"} and isinstance(s["reason"], str)
    assert st["torch"]["available"]
    case = make_case()
    monkeypatch.setenv("FGPO_IMPL", "reference")
    assert _registry.resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("FGPO_IMPL", "bogus")
    with pytest.raises(ValueError, match="impl"):
        fk.token_kl(case["h"], case["hr"], case["w"])
    monkeypatch.delenv("FGPO_IMPL")
    assert _registry.resolve(None, torch.device("cpu")) in ("torch", "triton")


def test_every_backend_satisfies_the_typed_contract():
    """torch / triton / cuda modules import without their hardware and match _backend.Backend:
    backward(h, hr, w, wr, temperature, stats: RowStats, grads: RowGrads, need: Needs)."""
    import inspect

    from fgpo_kernels._backend import Backend

    for name in ("torch", "triton", "cuda"):
        mod = importlib.import_module(_registry._ENTRIES[name].module)
        assert isinstance(mod, Backend), name
        params = list(inspect.signature(mod.backward).parameters)
        assert params[:8] == ["h", "hr", "w", "wr", "temperature", "stats", "grads", "need"], name
        assert list(inspect.signature(mod.forward).parameters)[:5] == params[:5], name


def test_ignore_index_constant_is_the_default():
    """``fk.IGNORE_INDEX`` is the one "no target" id: every public default uses it."""
    import inspect

    assert fk.IGNORE_INDEX == -100
    for fn in (fk.token_kl, fk.token_logprobs, fk.FiReMPOLoss):
        assert inspect.signature(fn).parameters["ignore_index"].default == fk.IGNORE_INDEX


def test_explicit_unavailable_impl_raises():
    if torch.cuda.is_available():
        pytest.skip("cuda tensors available")
    case = make_case()
    with pytest.raises(RuntimeError, match="cuda"):
        fk.token_kl(case["h"], case["hr"], case["w"], impl="cuda")


def test_bad_inputs_name_the_argument():
    c = make_case(lead=(4, 5), d=8, v=11)
    h, hr, w = c["h"], c["hr"], c["w"]
    bad = [
        (lambda: fk.token_kl(h, hr, w[:, :7]), ValueError, "weight"),
        (lambda: fk.token_kl(h, hr[..., :7], w), ValueError, "ref_hidden"),
        (lambda: fk.token_kl(h, hr[:3], w), ValueError, "ref_hidden"),
        (lambda: fk.token_kl(h, hr, w, torch.randn(12, 8)), ValueError, "ref_weight"),
        (lambda: fk.token_kl(h.long(), hr, w), TypeError, "policy_hidden"),
        (lambda: fk.token_kl(h, hr, w.double()), TypeError, "weight"),
        (lambda: fk.token_kl(h, hr, w[0]), ValueError, "weight"),
        (lambda: fk.token_kl(h, hr, w, mask=torch.ones(4, 4)), ValueError, "mask"),
        (lambda: fk.token_kl(h, hr, w, targets=torch.full((4, 5), 11)), ValueError, "targets"),
        (lambda: fk.token_kl(h, hr, w, targets=torch.full((4, 5), -1)), ValueError, "targets"),
        (lambda: fk.token_kl(h, hr, w, targets=torch.zeros(4, 5)), TypeError, "targets"),
        (
            lambda: fk.token_kl(h, hr, w, targets=torch.zeros(20, dtype=torch.long)),
            ValueError,
            "targets",
        ),
        (lambda: fk.token_kl(h, hr, w, reduction="avg"), ValueError, "reduction"),
        (lambda: fk.token_kl(h, hr, w, impl="fast"), ValueError, "impl"),
        (lambda: fk.token_kl(h, hr, w, temperature=0.0), ValueError, "temperature"),
        (lambda: fk.token_kl(h, hr, w, lambda_="x"), TypeError, "lambda_"),
        (lambda: fk.token_logprobs(h, w, None), TypeError, "targets"),
        (
            lambda: fk.token_logprobs(h, w, torch.zeros(4, 6, dtype=torch.long)),
            ValueError,
            "targets",
        ),
    ]
    for fn, exc, word in bad:
        with pytest.raises(exc, match=word):
            fn()


@pytest.mark.parametrize("grads", [("h", "w"), ("h", "hr", "w"), ("hr",), ("h", "hr", "w", "wr")])
def test_torch_impl_many_tiles(monkeypatch, grads):
    """Force many row chunks x vocabulary chunks (online log-sum-exp across column chunks)."""
    from fgpo_kernels import torch_impl

    monkeypatch.setattr(torch_impl, "_MIN_ROWS", 8)
    monkeypatch.setattr(torch_impl, "_MIN_COLS", 64)
    monkeypatch.setenv("FGPO_TORCH_CHUNK_ELEMS", "700")  # 8 rows x 87 columns
    assert torch_impl._tiles(37, 1003) == (8, 87)
    case = make_case(lead=(37,), v=1003, mask="weights", shared="wr" not in grads)
    ref = run(case, "reference", grads=grads, upcast=True, temperature=0.8)
    got = run(case, "torch", grads=grads, temperature=0.8)
    compare(got, ref, 2e-5, 1e-4, "[torch tiles] ")
