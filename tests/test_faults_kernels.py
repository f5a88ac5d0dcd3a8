"""Fault audit of the kernel package's inputs (issue 11, item 7 and the named errors): every
invalid argument is a clear error that names it, and a NaN loss never hides behind finite
metrics."""

from __future__ import annotations

import math

import pytest
import torch

import fgpo_kernels as fk
from fgpo_kernels import FiReMPOLoss, SequenceStates


def _seq(b=2, length=5, d=8, v=11) -> SequenceStates:
    return SequenceStates(
        torch.randn(b, length, d),
        torch.randn(b, length, d),
        torch.randint(0, v, (b, length)),
        torch.ones(b, length),
    )


def _four(b=2, d=8):
    return [_seq(b, d=d) for _ in range(4)]


H, W, T = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: fk.token_kl(H, H, W, lambda_=1.5), ValueError, "lambda_"),
        (lambda: fk.token_kl(H, H, W, lambda_=-0.1), ValueError, "lambda_"),
        (lambda: fk.token_kl(H, H, W, targets=T, ignore_index=-100.0), TypeError, "ignore_index"),
        (lambda: fk.token_kl(H, H, W, targets=T, ignore_index=None), TypeError, "ignore_index"),
        (lambda: fk.token_kl(H, H, W, ignore_index=True), TypeError, "ignore_index"),
        (lambda: fk.token_logprobs(H, W, T, ignore_index=None), TypeError, "ignore_index"),
        (lambda: fk.token_logprobs(H, W, T, ignore_index=2.5), TypeError, "ignore_index"),
        (lambda: fk.token_kl(H, H, W, temperature=1e-40), ValueError, "temperature"),
        (lambda: fk.token_logprobs(H, W, T, temperature=1e-30), ValueError, "temperature"),
        (
            lambda: fk.token_kl(torch.randn(4, 0), torch.randn(4, 0), torch.randn(11, 0)),
            ValueError,
            "D",
        ),
        (lambda: fk.token_logprobs(torch.randn(4, 0), torch.randn(11, 0), T), ValueError, "D"),
        (lambda: fk.token_kl(H.to("meta"), H.to("meta"), W.to("meta")), ValueError, "meta"),
        (lambda: fk.token_logprobs(H, W.to("meta"), T), ValueError, "meta"),
        (lambda: FiReMPOLoss(impl="garbage"), ValueError, "impl"),
        (lambda: FiReMPOLoss(ignore_index=None), TypeError, "ignore_index"),
        (lambda: FiReMPOLoss(ignore_index=-100.0), TypeError, "ignore_index"),
    ],
)
def test_invalid_kernel_arguments_name_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_smallest_allowed_temperature_stays_finite():
    """The temperature floor is where ordinary inputs still give finite values and gradients;
    the old code accepted 1e-40 and returned NaN from finite inputs."""
    from fgpo_kernels.token_kl import MIN_TEMPERATURE

    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    out = fk.token_kl(h, torch.randn(6, 16), w, targets=torch.randint(0, 50, (6,)),
                      temperature=MIN_TEMPERATURE, impl="torch")  # fmt: skip
    (out.loss + out.policy_logps.sum()).backward()
    assert math.isfinite(float(out.loss.detach()))
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_fgpo_impl_garbage_names_the_variable(monkeypatch):
    monkeypatch.setenv("FGPO_IMPL", "garbage")
    with pytest.raises(ValueError, match="FGPO_IMPL"):
        fk.token_kl(H, H, W)
    with pytest.raises(ValueError, match="FGPO_IMPL"):
        FiReMPOLoss(gamma=0.0)(W, *_four()[:2])


def test_empty_batch_mean_is_an_error_sum_is_zero():
    w = torch.randn(11, 8)
    with pytest.raises(ValueError, match="B=0"):
        FiReMPOLoss()(w, *_four(b=0))
    out = FiReMPOLoss(reduction="sum")(w, *_four(b=0))
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("bad", [-1.0, -0.5])
def test_negative_has_corrupt_is_rejected(bad):
    w = torch.randn(11, 8)
    with pytest.raises(ValueError, match="has_corrupt"):
        FiReMPOLoss(gamma=1.0)(w, *_four(), has_corrupt=torch.tensor([1.0, bad]))


def test_meta_and_zero_width_inputs_to_the_loss_name_the_problem():
    w = torch.randn(11, 0)
    with pytest.raises(ValueError, match="D"):
        FiReMPOLoss()(w, *_four(d=0))
    meta = [SequenceStates(*(x.to("meta") for x in s[:4])) for s in _four()]
    with pytest.raises(ValueError, match="meta"):
        FiReMPOLoss()(torch.randn(11, 8).to("meta"), *meta)


def test_a_nan_example_shows_in_every_summary_metric_it_feeds():
    """Example 0 has NaN hidden states: the loss is NaN, and so are the batch means of the
    metrics that example feeds (the old summary() skipped NaN and logged a finite loss/rank).
    Visual metrics still skip examples without a corrupted image (their NaN is by design)."""
    w = torch.randn(11, 8)
    c, r, cc, rc = _four(b=3)
    pol = c.policy.clone()
    pol[0] = float("nan")
    c = SequenceStates(pol, c.ref, c.targets, c.mask)
    out = FiReMPOLoss()(w, c, r, cc, rc, has_corrupt=torch.tensor([1.0, 1.0, 0.0]))
    assert math.isnan(float(out.loss))
    s = out.summary()
    for key in ("loss/rank", "loss/total", "rewards/chosen", "rewards/margins", "kl/mixed"):
        assert math.isnan(s[key]), key
    assert math.isfinite(s["logps/rejected"])  # example 0's rejected pass is finite
    assert math.isfinite(s["visual/loss"])  # so are its corrupted passes
    # A NaN in a corrupted pass (example 1 has v') shows in the visual means too.
    ccp = cc.policy.clone()
    ccp[1] = float("nan")
    cc = SequenceStates(ccp, cc.ref, cc.targets, cc.mask)
    out = FiReMPOLoss()(w, r, r, cc, rc, has_corrupt=torch.tensor([1.0, 1.0, 0.0]))
    assert math.isnan(float(out.loss)) and math.isnan(out.summary()["visual/loss"])
    # Without the NaN, the visual means skip example 2 (no v') and are finite.
    c2, r2, cc2, rc2 = _four(b=3)
    ok = FiReMPOLoss()(w, c2, r2, cc2, rc2, has_corrupt=torch.tensor([1.0, 1.0, 0.0]))
    v = ok.metrics["visual/loss"]
    assert math.isnan(float(v[2]))
    assert ok.summary()["visual/loss"] == pytest.approx(float(v[:2].mean()))
