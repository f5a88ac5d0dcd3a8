"""FiReMPOLoss: the whole objective against a float64 materialized definition, presets, switches,
gradient accumulation, bad input and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import compare, rel_err
from loss_helpers import (
    IMPLS,
    NAMES,
    cast_seqs,
    make_batch,
    materialized,
    ours,
    response_mask_batch,
    summed_logps,
    trl_dpo_loss,
)

import fgpo_kernels as fk
from fgpo_kernels import FiReMPOLoss, SequenceStates

# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "mask,alpha_v,sep_ref",
    [("binary", (0.0, 0.0), False), ("weights", (0.3, 0.2), False), ("weights", (0.0, 0.5), True)],
)
def test_matches_materialized_objective(impl, mask, alpha_v, sep_ref):
    batch = make_batch(mask=mask, d_ref=40 if sep_ref else None)
    cfg = dict(beta=float(torch.empty(()).uniform_(0.05, 0.5)), alpha=0.3, gamma=0.7,
               lambda_=float(torch.rand(())), alpha_v1=alpha_v[0], alpha_v2=alpha_v[1])  # fmt: skip
    want = materialized(batch, **cfg)
    if impl == "reference":  # the same definition through our code path: float64, tight
        got, _ = ours(batch, impl, dtype=torch.float64, **cfg)
        compare(got, want, 1e-10, 1e-10, "[reference f64] ")
    got, _ = ours(batch, impl, **cfg)
    compare(got, want, 5e-5, 1e-4, f"[{impl}] ")


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.id != "reference"])
def test_metrics_consistent(impl):
    batch = make_batch(mask="weights", corrupt=(1, 0, 1))
    got, out = ours(batch, impl, beta=0.2)
    m = out.metrics
    for k in (*fk.loss.METRIC_KEYS, *fk.loss.VISUAL_METRIC_KEYS):
        assert k in m and m[k].shape == (3,) and not m[k].requires_grad, k
    torch.testing.assert_close(m["rewards/chosen"], got["chosen_rewards"])
    torch.testing.assert_close(
        m["rewards/margins"], got["chosen_rewards"] - got["rejected_rewards"]
    )
    assert torch.equal(m["rewards/accuracies"], (m["rewards/margins"] > 0).float())
    torch.testing.assert_close(m["kl/mixed"], 0.5 * m["kl/forward"] + 0.5 * m["kl/reverse"])
    assert (m["kl/forward"] >= 0).all() and (m["kl/reverse"] >= 0).all()
    # visual metrics are NaN exactly where there is no corrupted image
    assert torch.isnan(m["visual/loss"][1]) and torch.isfinite(m["visual/loss"][[0, 2]]).all()
    torch.testing.assert_close(m["visual/loss"][[0, 2]], got["visual"][[0, 2]])
    s = out.summary()
    assert set(s) == set(m) and all(isinstance(x, float) for x in s.values())
    assert s["visual/loss"] == pytest.approx(float(m["visual/loss"][[0, 2]].mean()))
    torch.testing.assert_close(m["loss/total"].mean(), out.loss.detach())


def test_one_fused_call_over_weighted_rows_only(monkeypatch):
    """The performance design: ONE token_kl call per forward, over exactly the rows with a
    nonzero weight of the sequences in use (corrupted rows only where has_corrupt)."""
    batch = make_batch(mask="weights", corrupt=(1, 0, 1))
    calls = []
    real = fk.loss.token_kl

    def spy(h, hr, *a, **kw):
        calls.append((h.shape[0], hr.shape[0]))
        return real(h, hr, *a, **kw)

    monkeypatch.setattr(fk.loss, "token_kl", spy)
    ours(batch, "torch")
    hc = batch["has_corrupt"]
    want = sum(int((s.mask != 0).sum()) for k, s in batch["seqs"].items() if "corrupt" not in k)
    want += sum(int((s.mask[hc] != 0).sum()) for k, s in batch["seqs"].items() if "corrupt" in k)
    assert calls == [(want, want)]
    calls.clear()
    ours(batch, "torch", gamma=0.0)  # no visual term: the corrupted sequences are not projected
    seqs = batch["seqs"]
    assert calls == [
        (int((seqs["chosen"].mask != 0).sum() + (seqs["rejected"].mask != 0).sum()),) * 2
    ]


def test_bool_mask_equals_float_mask():
    batch = make_batch(mask="binary")
    a, _ = ours(batch, "torch")
    for k, s in batch["seqs"].items():
        batch["seqs"][k] = s._replace(mask=s.mask.bool())
    b, _ = ours(batch, "torch")
    compare(b, a, 0.0, 0.0)


def test_views_of_longer_hidden_states_are_accepted():
    """``hidden[:, :-1]`` (the shift a trainer does) is a non-contiguous view: same result."""
    batch = make_batch(mask="weights")
    want, _ = ours(batch, "torch")
    w, _, seqs = cast_seqs(batch, torch.float32)
    longs, views = {}, []
    for k in NAMES:
        s = seqs[k]
        longs[k] = torch.cat([s.policy, s.policy[:, :1]], 1).detach().requires_grad_()
        views.append(
            s._replace(
                policy=longs[k][:, :-1], ref=torch.stack([s.ref, s.ref], 2).flatten(1, 2)[:, ::2]
            )
        )
        assert not views[-1].policy.is_contiguous() and not views[-1].ref.is_contiguous()
    out = FiReMPOLoss(impl="torch")(w, *views, has_corrupt=batch["has_corrupt"])
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), want["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, want["dw"], rtol=1e-5, atol=1e-7)
    for k in NAMES:
        torch.testing.assert_close(longs[k].grad[:, :-1], want["d_" + k], rtol=1e-5, atol=1e-7)
        assert not longs[k].grad[:, -1].any()


# ---------------------------------------------------------------- presets


def test_dpo_preset_is_sigmoid_dpo_formula():
    batch = response_mask_batch()
    beta = 0.2
    got, out = ours(
        batch,
        "torch",
        dtype=torch.float64,
        loss_fn=FiReMPOLoss.preset("dpo", beta=beta, impl="torch"),
    )
    pc, pr = (summed_logps(batch, k, "policy").sum(1) for k in ("chosen", "rejected"))
    rc, rr = (summed_logps(batch, k, "ref").sum(1) for k in ("chosen", "rejected"))
    want = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["logps/chosen"], pc.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(got["visual"], torch.zeros(3, dtype=torch.float64))


def test_dpo_preset_equals_trl_sigmoid_dpo():
    batch = response_mask_batch()
    beta = 0.15
    got, _ = ours(batch, "torch", dtype=torch.float64, loss_fn=FiReMPOLoss.preset("DPO", beta=beta))
    pc, pr = (summed_logps(batch, k, "policy") for k in ("chosen", "rejected"))
    rc, rr = (summed_logps(batch, k, "ref").sum(1) for k in ("chosen", "rejected"))
    mc, mr = (batch["seqs"][k].mask for k in ("chosen", "rejected"))
    trl_loss = trl_dpo_loss("sigmoid", beta, pc, pr, rc, rr, mc, mr)
    torch.testing.assert_close(got["loss"], trl_loss.detach().double(), rtol=1e-10, atol=1e-12)


def test_rrpo_preset_is_rank_plus_forward_kl():
    batch = make_batch(mask="weights")
    loss_fn = FiReMPOLoss.preset("rrpo", impl="torch")
    assert (loss_fn.gamma, loss_fn.lambda_, loss_fn.alpha) == (0.0, 1.0, 0.01)
    got, out = ours(batch, "torch", loss_fn=loss_fn)
    m = out.metrics
    torch.testing.assert_close(got["mixed_kl"], m["kl/forward"])
    want = (got["rank"] + 0.01 * m["kl/forward"]).mean()
    torch.testing.assert_close(got["loss"], want)
    assert "visual/loss" not in m  # corrupted sequences are not even projected
    want = materialized(batch, beta=0.1, alpha=0.01, gamma=0.0, lambda_=1.0)
    for k in ("visual", "visual_v1", "visual_v2"):  # not computed: their sequences are unused
        assert not got.pop(k).any()
        want.pop(k)
    compare(got, want, 5e-5, 1e-4)


@pytest.mark.parametrize("name", ["mask_dpo", "Mask-DPO"])
def test_mask_dpo_preset_is_rank_only(name):
    batch = make_batch(mask="binary")
    loss_fn = FiReMPOLoss.preset(name, beta=0.3, impl="torch")
    got, _ = ours(batch, "torch", loss_fn=loss_fn)
    torch.testing.assert_close(got["loss"], got["rank"].mean())
    want = materialized(batch, beta=0.3, alpha=0.0, gamma=0.0, lambda_=0.5)
    compare(got, {k: want[k] for k in ("loss", "rank", "dw", "d_chosen", "d_rejected")}, 5e-5, 1e-4)
    assert not got["d_chosen_corrupt"].any()


def test_fire_mpo_preset_is_the_defaults():
    a, b = FiReMPOLoss.preset("fire-mpo"), FiReMPOLoss()
    assert repr(a) == repr(b)
    assert (b.beta, b.alpha, b.gamma, b.lambda_, b.alpha_v1, b.alpha_v2) == (
        0.1,
        0.01,
        0.1,
        0.5,
        0,
        0,
    )
    assert FiReMPOLoss.preset("fire_mpo", gamma=0.5).gamma == 0.5
    with pytest.raises(ValueError, match="preset"):
        FiReMPOLoss.preset("ppo")


def test_loss_presets_is_the_one_public_table():
    """``fk.LOSS_PRESETS`` (what the trainer reads) is exactly what ``FiReMPOLoss.preset`` uses:
    name -> coefficient overrides, every other coefficient at its default."""
    assert set(fk.LOSS_PRESETS) == {"dpo", "rrpo", "mask_dpo", "fire_mpo"}
    defaults = FiReMPOLoss()
    for name, fixed in fk.LOSS_PRESETS.items():
        loss = FiReMPOLoss.preset(name)
        for k in ("beta", "alpha", "gamma", "lambda_", "alpha_v1", "alpha_v2"):
            assert getattr(loss, k) == fixed.get(k, getattr(defaults, k)), (name, k)


# ---------------------------------------------------------------- switches and accumulation


def test_has_corrupt_all_false_equals_gamma_zero():
    batch = make_batch(mask="weights", corrupt=(0, 0, 0))
    a, _ = ours(batch, "torch", gamma=0.4, alpha_v1=0.2, alpha_v2=0.3)
    b, _ = ours(batch, "torch", gamma=0.0)
    compare(a, b, 1e-7, 1e-7)
    # ... and then the corrupted sequences may be left out entirely
    loss_fn = FiReMPOLoss(gamma=0.4, impl="torch")
    w, _, seqs = cast_seqs(batch, torch.float32)
    out = loss_fn(w, seqs["chosen"], seqs["rejected"], has_corrupt=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out.loss.detach(), b["loss"])


def test_float_has_corrupt_weights_the_visual_terms():
    batch = make_batch(mask="binary", corrupt=(1, 1, 1))
    full, _ = ours(batch, "torch", gamma=0.5)
    batch["has_corrupt"] = torch.tensor([0.5, 0.0, 2.0])
    half, _ = ours(batch, "torch", gamma=0.5)
    torch.testing.assert_close(half["visual"], full["visual"] * batch["has_corrupt"])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation_equals_one_big_batch(reduction):
    b = 4
    batch = make_batch(b=b, mask="weights", corrupt=(1, 0, 1, 1))
    cfg = dict(beta=0.2, alpha=0.1, gamma=0.3, alpha_v1=0.1)
    big, _ = ours(batch, "torch", **cfg)
    splits = [(0, 2), (2, 4)] if reduction == "mean" else [(0, 1), (1, 4)]
    w, _, seqs = cast_seqs(batch, torch.float32)
    loss_fn = FiReMPOLoss(impl="torch", reduction=reduction, **cfg)
    total = 0.0
    for s, e in splits:
        part = [SequenceStates(*(x[s:e] for x in seqs[k][:4])) for k in NAMES]
        out = loss_fn(w, *part, has_corrupt=batch["has_corrupt"][s:e])
        # mean: equal micro-batches, divide by their count; sum: divide by the global batch
        scaled = out.loss / len(splits) if reduction == "mean" else out.loss / b
        scaled.backward()
        total += float(scaled.detach())
    assert total == pytest.approx(float(big["loss"]), rel=1e-5)
    assert rel_err(w.grad, big["dw"]) <= 1e-5
    for k in NAMES:
        assert rel_err(seqs[k].policy.grad, big["d_" + k]) <= 1e-5, k


def test_all_zero_masks_give_log2_and_zero_grads():
    batch = make_batch(mask="binary")
    for k, s in batch["seqs"].items():
        batch["seqs"][k] = s._replace(mask=torch.zeros_like(s.mask))
    got, _ = ours(batch, "torch")
    # every R is 0: rank = log 2, visual = has_corrupt · log 2, KL = 0
    hc = batch["has_corrupt"].float().mean()
    torch.testing.assert_close(got["loss"], math.log(2.0) * (1 + 0.1 * hc))
    for k in ("dw", *("d_" + n for n in NAMES)):
        assert not got[k].any(), k


def test_no_grad_forward():
    batch = make_batch()
    w, _, seqs = cast_seqs(batch, torch.float32, grad=False)
    with torch.no_grad():
        out = FiReMPOLoss(impl="torch")(w, *(seqs[k] for k in NAMES))
    assert torch.isfinite(out.loss) and not out.loss.requires_grad


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    batch = make_batch(b=3, seq_len=8, d=24, v=500)
    w, _, seqs = cast_seqs(batch, torch.float32, grad=False)
    c, r, cc, rc = (seqs[k] for k in NAMES)
    loss_fn = FiReMPOLoss(impl="torch")
    short = SequenceStates(*(x[:2] for x in r[:4]))
    shorter = SequenceStates(r.policy[:, :7], r.ref[:, :7], r.targets[:, :7], r.mask[:, :7])
    bad_t = c.targets.clone()
    bad_t[0, 0] = -100  # ignore_index where the mask is 1
    neg_t, big_t = c.targets.clone(), r.targets.clone()
    neg_t[1, 0] = -1  # not ignore_index: must not be silently skipped
    big_t[2, 0] = 500
    cases = [
        (lambda: loss_fn(w, c, short, cc, rc), ValueError, "rejected has batch size B=2"),
        (lambda: loss_fn(w, c, shorter, cc, rc), ValueError, "rejected has length L=7"),
        (lambda: loss_fn(w, c, r, cc, SequenceStates(*(x[:2] for x in rc[:4]))), ValueError,
         "rejected_corrupt has batch size"),
        (lambda: loss_fn(w, c, r), ValueError, "chosen_corrupt is required when gamma"),
        (lambda: loss_fn(w, c, r, cc), ValueError, "rejected_corrupt is required"),
        (lambda: FiReMPOLoss(gamma=0, alpha_v2=0.1)(w, c, r, cc), ValueError,
         "rejected_corrupt is required when alpha_v2"),
        (lambda: loss_fn(w, c, r, cc, rc, has_corrupt=torch.ones(2)), ValueError, "has_corrupt"),
        (lambda: loss_fn(w[:, :20], c, r, cc, rc), ValueError, "weight has D=20"),
        (lambda: loss_fn(w, c._replace(targets=bad_t), r, cc, rc), ValueError,
         "chosen.targets is ignore_index"),
        (lambda: loss_fn(w, c._replace(targets=neg_t), r, cc, rc), ValueError,
         r"chosen.targets must be in \[0, V=500\)"),
        (lambda: loss_fn(w, c, r._replace(targets=big_t), cc, rc), ValueError,
         "rejected.targets must be in"),
        (lambda: loss_fn(w, c._replace(mask=c.mask[:, :5]), r, cc, rc), ValueError, "chosen.mask"),
        (lambda: loss_fn(w, c._replace(targets=c.targets.float()), r, cc, rc), TypeError,
         "chosen.targets"),
        (lambda: loss_fn(w, c, r._replace(policy=r.policy[..., :20]), cc, rc), ValueError,
         "rejected.policy has hidden size 20"),
        (lambda: loss_fn(w, c, r._replace(policy=r.policy.double()), cc, rc), TypeError,
         "rejected.policy dtype"),
        (lambda: FiReMPOLoss(gamma=0)(w, c._replace(ref=c.ref[..., :20]),
                                      r._replace(ref=r.ref[..., :20])), ValueError, "ref_weight"),
        (lambda: loss_fn(w, (c.policy, c.ref), r, cc, rc), TypeError, "chosen must be"),
        (lambda: FiReMPOLoss(beta=0.0), ValueError, "beta"),
        (lambda: FiReMPOLoss(lambda_=1.5), ValueError, "lambda_"),
        (lambda: FiReMPOLoss(gamma=-1.0), ValueError, "gamma"),
        (lambda: FiReMPOLoss(reduction="none"), ValueError, "reduction"),
        (lambda: FiReMPOLoss(impl="fast")(w, c, r, cc, rc), ValueError, "impl"),
    ]  # fmt: skip
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.id in ("torch", "triton", "cuda")])
def test_torch_compile_matches_eager(impl):
    batch = make_batch(b=2, seq_len=7, d=24, v=257)
    loss_fn = FiReMPOLoss(impl=impl, alpha=0.2, gamma=0.3)

    def step(w, c, r, cc, rc, hc):
        out = loss_fn(w, c, r, cc, rc, has_corrupt=hc)
        return out.loss, out.chosen_rewards

    results = []
    for fn in (step, torch.compile(step)):
        w, _, seqs = cast_seqs(batch, torch.float32)
        loss, rewards = fn(w, *(seqs[k] for k in NAMES), batch["has_corrupt"][:2])
        loss.backward()
        results.append((loss.detach(), rewards.detach(), w.grad, seqs["chosen"].policy.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
