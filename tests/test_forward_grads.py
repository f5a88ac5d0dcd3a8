"""Gradients computed in the forward (docs/design.md §3.8): each plan against the recompute
path (``FGPO_GRADS_IN_FORWARD=off``) and the float64 definition, and which plan a call takes.

Plans: ``held`` (token_kl without targets: only the loss carries a gradient), ``jacobian``
(frozen head: per-row gradients, any incoming gradient), ``recompute`` (the rest)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import compare, rel_err

import fgpo_kernels as fk
from fgpo_kernels import _registry, torch_impl

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _impls() -> list:
    out = []
    for name in ("torch", "triton"):
        ok, why = _registry._usable_on(name, torch.device(DEV))
        out.append(pytest.param(name, marks=[] if ok else [pytest.mark.skip(reason=why)], id=name))
    return out


IMPLS = _impls()


def _case(n=29, d=24, v=517, shared=True, d_ref=20):
    """float64 inputs: policy and reference hidden states, head(s), 0/1/5 weights, targets."""
    h = torch.randn(n, d, dtype=torch.float64)
    hr = h + 0.3 * torch.randn_like(h) if shared else torch.randn(n, d_ref, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64) * 3 / math.sqrt(d)
    wr = None if shared else torch.randn(v, d_ref, dtype=torch.float64) * 3 / math.sqrt(d_ref)
    m = torch.where(torch.rand(n) < 0.3, 5.0, 1.0).double() * (torch.rand(n) < 0.8)
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < 0.2] = -100
    return dict(h=h, hr=hr, w=w, wr=wr, mask=m, targets=t)


class Calls:
    """Counts the calls of a backend's functions (monkeypatched wrappers)."""

    def __init__(self, monkeypatch, impl):
        mod = _registry.module(impl)
        self.n = {}
        for name in ("backward", "forward_with_grads", "forward_with_jacobians"):
            real = getattr(mod, name)

            def spy(*a, _real=real, _name=name, **k):
                self.n[_name] = self.n.get(_name, 0) + 1
                return _real(*a, **k)

            monkeypatch.setattr(mod, name, spy)


def run(case, impl, grads, *, targets, plan="auto", reduction="sum", upcast=False,
        outputs=(3.7, 0.0, 0.0, 0.0), monkeypatch=None, backward_twice=False,
        dtype=torch.float32, **kw):  # fmt: skip
    """Gradients of 3.7 * loss (per-row weights 0..1 with reduction "none"), plus coefficients
    times sums of lp, lpr and of fkl (weighted 0..1), w.r.t. ``grads``."""
    if monkeypatch is not None:
        monkeypatch.setenv("FGPO_GRADS_IN_FORWARD", plan)
    leaves = {}
    for k in ("h", "hr", "w", "wr"):
        if case[k] is not None:
            x = case[k].to(device=DEV, dtype=torch.float64 if upcast else dtype)
            leaves[k] = x.clone().requires_grad_(k in grads)
    tgt = case["targets"].to(DEV) if targets else None
    out = fk.token_kl(leaves["h"], leaves["hr"], leaves["w"], leaves.get("wr"),
                      mask=case["mask"].to(DEV), targets=tgt, reduction=reduction, impl=impl,
                      lambda_=0.3, temperature=0.8, **kw)  # fmt: skip
    a, b, c, f = outputs
    ramp = torch.linspace(0, 1, len(out.forward_kl), device=DEV)  # row 0: weight 0
    total = a * (out.loss * ramp if reduction == "none" else out.loss).sum()
    if b or c:
        total = total + b * out.policy_logps.sum() + c * out.ref_logps.sum()
    if f:
        total = total + f * (out.forward_kl * ramp).sum()
    total.backward(retain_graph=backward_twice)
    if backward_twice:
        total.backward()
    return {"d" + k: x.grad for k, x in leaves.items() if x.requires_grad}


def _check(case, impl, grads, monkeypatch, tol=1e-4, **kw):
    """The default (auto) plan against the recompute plan and against float64."""
    ref = run(case, "reference", grads, upcast=True, **kw)
    off = run(case, impl, grads, plan="off", monkeypatch=monkeypatch, **kw)
    calls = Calls(monkeypatch, impl)
    got = run(case, impl, grads, plan="auto", monkeypatch=monkeypatch, **kw)
    compare(got, ref, 0, tol, f"[{impl} auto vs f64] ")
    compare(got, off, 0, tol, f"[{impl} auto vs recompute] ")
    return calls.n


# ------------------------------------------------------------------------- plan "held"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shared,grads,reduction",
    [
        (True, ("h", "w"), "sum"),  # the SPEC benchmark's case (trained head)
        (True, ("h",), "mean"),  # frozen head
        (True, ("h", "hr", "w"), "sum"),
        (False, ("h", "hr", "w", "wr"), "mean"),  # a separate reference head
    ],
)
def test_held_plan_equals_recompute(impl, shared, grads, reduction, monkeypatch):
    """No targets: gradients computed in the forward, only scaled in the backward (loss * 3.7):
    the backend's backward never runs. torch: 12-row chunks; triton: all rows at once."""
    budget = 0.05 if impl == "torch" else 1.0
    n = _check(_case(shared=shared), impl, grads, monkeypatch, targets=False,
               reduction=reduction, tile_budget_mb=budget)  # fmt: skip
    assert n == {"forward_with_grads": 1}, n


@pytest.mark.parametrize("impl", IMPLS)
def test_held_plan_other_upstreams_are_recomputed(impl, monkeypatch):
    """Per-row upstream weights (reduction "none") cannot scale one dW: recomputed; the
    forward_kl output differentiated directly: its share is recomputed and added."""
    case = _case()
    for outputs in ((3.7, 0.0, 0.0, 0.0), (3.7, 0.0, 0.0, 0.8)):
        n = _check(case, impl, ("h", "w"), monkeypatch, targets=False, reduction="none",
                   outputs=outputs)  # fmt: skip
        assert n == {"forward_with_grads": 1, "backward": 1}, n
    n = _check(case, impl, ("h", "w"), monkeypatch, targets=False, outputs=(3.7, 0, 0, 0.8))
    assert n == {"forward_with_grads": 1, "backward": 1}, n  # only forward_kl's share
    n = _check(case, impl, ("h", "hr"), monkeypatch, targets=False, reduction="none")
    assert n == {"forward_with_grads": 1}, n  # per-row weights, no dW: scaled row by row


def test_held_plan_many_chunks_under_a_small_budget(monkeypatch):
    """A budget of a few rows: many row chunks x many vocabulary tiles (torch)."""
    monkeypatch.setattr(torch_impl, "_MIN_COLS", 64)
    monkeypatch.setenv("FGPO_TORCH_CHUNK_ELEMS", "500")
    case = _case(n=37, v=1003)
    budget_mb = 3 * 1003 * 8 / 2**20  # 3 rows (z and zr) per chunk
    assert torch_impl.held_rows(37, 1003, True, torch.float32, int(budget_mb * 2**20)) == 3
    _check(case, "torch", ("h", "w"), monkeypatch, targets=False, tile_budget_mb=budget_mb)


# --------------------------------------------------------------------- plan "jacobian"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shared", [True, False])
def test_jacobian_plan_any_upstream(impl, shared, monkeypatch):
    """Frozen head, targets given: per-row gradients from the forward serve the loss, both
    log-probs and forward_kl (also at rows of weight 0, recomputed) in one backward."""
    n = _check(_case(shared=shared), impl, ("h",), monkeypatch, targets=True,
               outputs=(3.7, 0.7, -0.4, 0.8))  # fmt: skip
    assert n == {"forward_with_jacobians": 1, "backward": 1}, n
    n = _check(_case(shared=shared), impl, ("h",), monkeypatch, targets=True,
               outputs=(3.7, 0.7, -0.4, 0.0))  # fmt: skip
    assert n == {"forward_with_jacobians": 1}, n


def test_token_logprobs_frozen_head_takes_the_jacobian_plan(monkeypatch):
    case = _case()
    h, w, t = case["h"].float(), case["w"].float(), case["targets"]
    g = torch.randn(h.shape[0])
    outs = {}
    for plan in ("auto", "off"):
        monkeypatch.setenv("FGPO_GRADS_IN_FORWARD", plan)
        hh = h.clone().requires_grad_()
        (fk.token_logprobs(hh, w, t, temperature=0.7, impl="torch") * g).sum().backward()
        outs[plan] = {"dh": hh.grad}
    compare(outs["auto"], outs["off"], 0, 1e-5)


def test_torch_jacobians_many_tiles_and_moving_maxima(monkeypatch):
    """Flash-style accumulation over many vocabulary tiles, with the row maxima moving late
    (large logits at the end of the vocabulary), against the float64 backward per row."""
    monkeypatch.setattr(torch_impl, "_MIN_ROWS", 8)
    monkeypatch.setattr(torch_impl, "_MIN_COLS", 32)
    monkeypatch.setenv("FGPO_TORCH_CHUNK_ELEMS", "300")
    case = _case(n=21, v=700)
    case["w"][600:] *= 3.0  # the largest logits come in the last tiles
    h, hr, w = case["h"], case["hr"], case["w"]
    n_kl = 13
    stats, jac = torch_impl.forward_with_jacobians(h.float(), hr.float(), w.float(), None, 0.9,
                                                   n_kl, 0)  # fmt: skip
    st64 = torch_impl.forward(h, hr, w, None, 0.9)
    want = {}
    for name, k in (("fkl", 0), ("rkl", 1), ("lp", 2)):
        gs = [None] * 4
        rows = n_kl if k < 2 else h.shape[0]
        gs[k] = torch.ones(rows, dtype=torch.float64)
        sub = fk._backend.RowStats(*(x[:rows] for x in st64))
        dh = torch_impl.backward(h[:rows], hr[:rows], w, None, 0.9, sub, fk._backend.RowGrads(*gs),
                                 fk._backend.Needs(True, False, False, False)).dh  # fmt: skip
        want[name] = dh
    compare({"d" + k: getattr(jac, k) for k in want}, {"d" + k: v for k, v in want.items()},
            0, 2e-5)  # fmt: skip
    compare({"lse": stats.lse}, {"lse": st64.lse}, 1e-6, 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("targets,grads", [(False, ("h", "w")), (True, ("h",))],
                         ids=["held", "jacobian"])  # fmt: skip
def test_bf16_within_2x_of_pytorch(impl, targets, grads, monkeypatch):
    """bf16 inputs: each plan's error against float64 is at most twice the materialized
    PyTorch path's in bf16 (+1e-3), as for the recompute path (docs/design.md §4.1)."""
    case = _case(n=41, d=64, v=1009)
    ref = run(case, "reference", grads, targets=targets, upcast=True)
    base = run(case, "reference", grads, targets=targets, dtype=torch.bfloat16)
    calls = Calls(monkeypatch, impl)
    got = run(case, impl, grads, targets=targets, dtype=torch.bfloat16, tile_budget_mb=1.0)
    assert set(calls.n) == {"forward_with_jacobians" if targets else "forward_with_grads"}
    for k, r in ref.items():
        e, e_pt = rel_err(got[k], r), rel_err(base[k], r)
        assert e <= 2 * e_pt + 1e-3, f"[{impl} bf16] {k}: {e:.3e} vs pytorch {e_pt:.3e}"


# ------------------------------------------------ every plan: retain_graph, accumulation


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("targets,grads", [(False, ("h", "w")), (True, ("h",))])
def test_retain_graph_double_backward(impl, targets, grads, monkeypatch):
    """A second backward through the same graph recomputes: exactly twice one backward."""
    case = _case()
    once = run(case, impl, grads, targets=targets, monkeypatch=monkeypatch)
    twice = run(case, impl, grads, targets=targets, monkeypatch=monkeypatch, backward_twice=True)
    compare(twice, {k: 2 * v for k, v in once.items()}, 0, 1e-5, "[retain_graph] ")


@pytest.mark.parametrize("targets,grads", [(False, ("h", "w")), (True, ("h",))])
def test_gradient_accumulation_over_two_calls(targets, grads, monkeypatch):
    """Two calls (two micro-batches, "sum") on the same leaves accumulate into .grad exactly
    like one call over both (and like the recompute path)."""
    case = _case()
    res = {}
    for plan, parts in (("auto", 2), ("off", 2), ("auto", 1)):
        monkeypatch.setenv("FGPO_GRADS_IN_FORWARD", plan)
        h, hr, w = (case[k].float().requires_grad_(k in grads) for k in ("h", "hr", "w"))
        for half in (slice(0, 15), slice(15, None)) if parts == 2 else (slice(None),):
            out = fk.token_kl(
                h[half],
                hr[half],
                w,
                mask=case["mask"][half].float(),
                targets=case["targets"][half] if targets else None,
                impl="torch",
            )
            (out.loss * 3.7 + (out.policy_logps.sum() if targets else 0)).backward()
        res[plan, parts] = {"d" + k: x.grad for k, x in (("h", h), ("w", w)) if x.requires_grad}
    compare(res["auto", 2], res["auto", 1], 0, 1e-5, "[two calls vs one] ")
    compare(res["auto", 2], res["off", 2], 0, 1e-5, "[auto vs recompute] ")


def test_budget_argument_and_environment(monkeypatch):
    case = _case()
    h, hr, w = case["h"].float(), case["hr"].float(), case["w"].float()
    for bad, exc in ((0, ValueError), (-1.0, ValueError), ("8", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="tile_budget_mb"):
            fk.token_kl(h, hr, w, tile_budget_mb=bad)
    monkeypatch.setenv("FGPO_TILE_BUDGET_MB", "lots")
    with pytest.raises(ValueError, match="FGPO_TILE_BUDGET_MB"):
        fk.token_kl(h, hr, w)
    with pytest.raises(ValueError, match="tile_budget_mb"):
        fk.FiReMPOLoss(tile_budget_mb=0)


def test_triton_declines_over_budget(monkeypatch):
    """Triton keeps all rows' logits or none: over the budget it takes the recompute path."""
    if not _registry._usable_on("triton", torch.device(DEV))[0]:
        pytest.skip("triton unavailable")
    calls = Calls(monkeypatch, "triton")
    case = _case()
    got = run(case, "triton", ("h", "w"), targets=False, monkeypatch=monkeypatch,
              tile_budget_mb=0.01)  # fmt: skip
    assert calls.n == {"forward_with_grads": 1, "backward": 1}, calls.n
    ref = run(case, "reference", ("h", "w"), targets=False, upcast=True)
    compare(got, ref, 0, 1e-4)


# ------------------------------------------------------------------------ FiReMPOLoss

NAMES = ("chosen", "rejected", "chosen_corrupt", "rejected_corrupt")


def _batch(b=3, seq_len=9, d=20, v=401, d_ref=None):
    """float64 sequences (policy ≈ reference + noise), 0/1/5 span weights, a v' switch."""
    w = torch.randn(v, d, dtype=torch.float64) * 3 / math.sqrt(d)
    wr = None if d_ref is None else torch.randn(v, d_ref, dtype=torch.float64) * 3 / d_ref**0.5
    seqs = {}
    for name in NAMES:
        pol = torch.randn(b, seq_len, d, dtype=torch.float64)
        ref = pol + 0.3 * torch.randn_like(pol) if wr is None else torch.randn(b, seq_len, d_ref)
        m = torch.where(torch.rand(b, seq_len) < 0.3, 5.0, 1.0) * (torch.rand(b, seq_len) < 0.6)
        m[:, 0] = 1.0
        seqs[name] = fk.SequenceStates(pol, ref.double(), torch.randint(0, v, (b, seq_len)),
                                       m.double())  # fmt: skip
    return dict(w=w, wr=wr, seqs=seqs, has_corrupt=torch.tensor([1, 0, 1][:b], dtype=torch.bool))


def _loss_grads(batch, impl, *, dtype=torch.float32, head_grad=False, upstream=None,
                twice=False, parts=((0, None),), **cfg):  # fmt: skip
    """Gradients of ``upstream(out)`` (default 3.7 * loss) over micro-batches ``parts``."""
    cfg = dict(dict(beta=0.3, alpha=0.2, gamma=0.5, lambda_=0.4), **cfg)
    cp = lambda x: x.detach().to(device=DEV, dtype=dtype, copy=True)  # fresh leaves
    w = cp(batch["w"]).requires_grad_(head_grad)
    wr = None if batch["wr"] is None else cp(batch["wr"])
    seqs = {k: fk.SequenceStates(cp(s.policy).requires_grad_(), cp(s.ref), s.targets.to(DEV),
                                 s.mask.to(DEV))
            for k, s in batch["seqs"].items()}  # fmt: skip
    loss_fn = fk.FiReMPOLoss(impl=impl, reduction="sum", **cfg)
    upstream = upstream or (lambda out: 3.7 * out.loss)
    for s0, s1 in parts:
        part = [fk.SequenceStates(*(x[s0:s1] for x in seqs[k][:4])) for k in NAMES]
        out = loss_fn(w, *part, has_corrupt=batch["has_corrupt"][s0:s1].to(DEV), ref_weight=wr)
        total = upstream(out)
        total.backward(retain_graph=twice)
        if twice:
            total.backward()
    res = {"d_" + k: s.policy.grad for k, s in seqs.items()}
    if head_grad:
        res["dw"] = w.grad
    return res


def _loss_check(batch, impl, monkeypatch, **kw):
    ref = _loss_grads(batch, "reference", dtype=torch.float64, **kw)
    monkeypatch.setenv("FGPO_GRADS_IN_FORWARD", "off")
    off = _loss_grads(batch, impl, **kw)
    monkeypatch.setenv("FGPO_GRADS_IN_FORWARD", "auto")
    calls = Calls(monkeypatch, impl)
    got = _loss_grads(batch, impl, **kw)
    compare(got, ref, 0, 1e-4, f"[{impl} auto vs f64] ")
    compare(got, off, 0, 1e-4, f"[{impl} auto vs recompute] ")
    return calls.n


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sep_ref", [False, True])
def test_loss_frozen_head_gradients_come_from_the_forward(impl, sep_ref, monkeypatch):
    """LoRA (frozen head) and a separate frozen reference head: the rank and visual terms
    couple an example's rows, yet per-row gradients from the forward give the exact gradient
    of the loss, scaled (x 3.7), and of any other output (rank, rewards) too."""
    batch = _batch(d_ref=16 if sep_ref else None)
    n = _loss_check(batch, impl, monkeypatch)
    assert n == {"forward_with_jacobians": 1}, n
    other = lambda out: (out.rank * torch.arange(3.0, device=DEV)).sum() - out.chosen_rewards[1]
    n = _loss_check(batch, impl, monkeypatch, upstream=other, alpha_v1=0.3)
    assert n == {"forward_with_jacobians": 1}, n


def test_loss_trained_head_recomputes(monkeypatch):
    n = _loss_check(_batch(), "torch", monkeypatch, head_grad=True)
    assert n == {"backward": 1}, n


@pytest.mark.parametrize("kw", [dict(twice=True), dict(parts=((0, 1), (1, 3)))],
                         ids=["retain_graph", "accumulation"])  # fmt: skip
def test_loss_retain_graph_and_accumulation(kw, monkeypatch):
    """A second backward through one graph, and micro-batches accumulating into .grad."""
    batch = _batch()
    _loss_check(batch, "torch", monkeypatch, **kw)
    once = _loss_grads(batch, "torch")
    if "twice" in kw:
        compare(_loss_grads(batch, "torch", **kw), {k: 2 * v for k, v in once.items()}, 0, 1e-5)
    else:  # "sum" reduction: micro-batches add up to the whole batch
        compare(_loss_grads(batch, "torch", **kw), once, 0, 1e-5)
