"""``loss_type``: every pairwise loss of the rank and visual terms against a float64 transcription
written from its definition, against TRL's DPOTrainer loss of the same name, on every impl, with
gradients; bad values; the trainer's config fields."""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import compare
from loss_helpers import (
    DEV,
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

# ε per loss type where it matters (exo_pair needs ε > 0; the EXO paper's 1e-3 is too small to
# tell a wrong log ε term from rounding, so a larger one).
EPS = {"robust": 0.2, "label_smoothing": 0.15, "exo_pair": 0.1}
TRL_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair")


def transcribed(loss_type: str, beta: float, eps: float):
    """The pairwise loss ``(R_w, R_l, Σm_w, Σm_l) -> (B,)`` in plain words: p = σ(β Δ) is the
    Bradley-Terry probability that the preferred sequence wins, Δ = R_w − R_l."""

    def pair(rw, rl, nw, nl):
        p = torch.sigmoid(beta * (rw - rl))
        if loss_type == "sigmoid":  # negative log-likelihood of the preference
            return -torch.log(p)
        if loss_type == "hinge":  # margin 1 on β Δ, nothing beyond it
            return (1 - beta * (rw - rl)).clamp(min=0)
        if loss_type == "ipo":  # squared distance of the mean-ρ gap to 1/(2β)
            gap = rw / nw.clamp(min=1) - rl / nl.clamp(min=1)
            return (gap - 0.5 / beta) ** 2
        if loss_type == "label_smoothing":  # the label is right with prob. 1 − ε: expected NLL
            return (1 - eps) * -torch.log(p) + eps * -torch.log(1 - p)
        if loss_type == "robust":  # unbiased under label flips of prob. ε (rDPO)
            return ((1 - eps) * -torch.log(p) - eps * -torch.log(1 - p)) / (1 - 2 * eps)
        if loss_type == "exo_pair":  # KL of the model's pair distribution [p, 1−p] to [1−ε, ε]
            return p * torch.log(p / (1 - eps)) + (1 - p) * torch.log((1 - p) / eps)
        if loss_type == "nca_pair":  # each reward on its own: w up, both pulled towards 0
            sw, sl = torch.sigmoid(beta * rw), torch.sigmoid(beta * rl)
            return -torch.log(sw) - 0.5 * torch.log(1 - sw) - 0.5 * torch.log(1 - sl)
        raise AssertionError(loss_type)

    return pair


CFG = dict(beta=0.4, alpha=0.3, gamma=0.7, lambda_=0.4, alpha_v1=0.2, alpha_v2=0.3)


@pytest.mark.parametrize("loss_type", fk.LOSS_TYPES)
def test_matches_transcription_float64(loss_type):
    """The whole objective (rank, visual, v1, v2, KL) with real token weights, reference impl in
    float64: values and gradients equal the materialized definition to rounding."""
    torch.manual_seed(zlib.crc32(loss_type.encode()) % 1000)  # hash() varies per process
    batch = make_batch(mask="weights", corrupt=(1, 0, 1))
    eps = EPS.get(loss_type, 0.0)
    want = materialized(batch, **CFG, pair=transcribed(loss_type, CFG["beta"], eps))
    got, out = ours(batch, "reference", dtype=torch.float64, **CFG, loss_type=loss_type,
                    label_smoothing=eps)  # fmt: skip
    compare(got, want, 1e-10, 1e-10, f"[{loss_type}] ")
    on = batch["has_corrupt"]  # the visual metric is the visual term before has_corrupt
    torch.testing.assert_close(out.metrics["visual/loss"][on], got["visual"][on])
    assert torch.isnan(out.metrics["visual/loss"][~on]).all()


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.id != "reference"])
def test_every_impl_every_loss_type(impl):
    """Odd shapes (B 3, L 9, D 29, V 509), separate reference head, every loss type: the fused
    impl in float32 against the float64 definition."""
    torch.manual_seed(7)
    batch = make_batch(b=3, seq_len=9, d=29, v=509, mask="binary", d_ref=31)
    cfg = dict(CFG, beta=0.15, alpha=0.05)  # terms of one size, so no term's rounding dominates
    for loss_type in fk.LOSS_TYPES:
        eps = EPS.get(loss_type, 0.0)
        want = materialized(batch, **cfg, pair=transcribed(loss_type, cfg["beta"], eps))
        got, _ = ours(batch, impl, **cfg, loss_type=loss_type, label_smoothing=eps)
        compare(got, want, 5e-5, 1e-4, f"[{impl} {loss_type}] ")


@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_rank_term_equals_trl(loss_type):
    """DPO data (response masks of different lengths per example), γ = α = 0: our loss is
    TRL's DPOTrainer loss of the same name on the same log-probs."""
    torch.manual_seed(11)
    batch = response_mask_batch(lengths=[9, 4, 7])
    beta, eps = 0.3, EPS.get(loss_type, 0.0)
    loss_fn = FiReMPOLoss.preset("dpo", beta=beta, loss_type=loss_type, label_smoothing=eps)
    got, _ = ours(batch, "reference", dtype=torch.float64, loss_fn=loss_fn)
    pc, pr = (summed_logps(batch, k, "policy") for k in ("chosen", "rejected"))
    rc, rr = (summed_logps(batch, k, "ref").sum(1) for k in ("chosen", "rejected"))
    mc, mr = (batch["seqs"][k].mask for k in ("chosen", "rejected"))
    want = trl_dpo_loss(loss_type, beta, pc, pr, rc, rr, mc, mr, label_smoothing=eps)
    # TRL takes log(1 − ε) and log ε of a float32 tensor: exo_pair agrees to float32's rounding.
    rtol = 1e-7 if loss_type == "exo_pair" else 1e-10
    torch.testing.assert_close(got["loss"], want.detach().double(), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("loss_type", fk.LOSS_TYPES)
def test_gradcheck_reference(loss_type):
    """Finite differences of the whole loss w.r.t. the policy states of a clean and a corrupted
    sequence and the head weight (float64, reference impl, tiny shapes). The reference head is
    a separate copy: the shared one is frozen, so a finite difference would move both."""
    torch.manual_seed(3)
    batch = make_batch(b=2, seq_len=4, d=5, v=11, mask="weights", corrupt=(1, 1))
    w, _, seqs = cast_seqs(batch, torch.float64)
    w_ref = w.detach().clone()
    loss_fn = FiReMPOLoss(impl="reference", **CFG, loss_type=loss_type,
                          label_smoothing=EPS.get(loss_type, 0.0))  # fmt: skip

    def f(w_, hc_, hrc_):
        s = dict(seqs, chosen=seqs["chosen"]._replace(policy=hc_),
                 rejected_corrupt=seqs["rejected_corrupt"]._replace(policy=hrc_))  # fmt: skip
        return loss_fn(w_, *(s[k] for k in NAMES), ref_weight=w_ref).loss

    args = (w, seqs["chosen"].policy, seqs["rejected_corrupt"].policy)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sigmoid_is_the_default_and_zero_smoothing_is_sigmoid():
    batch = make_batch(mask="weights")
    base, _ = ours(batch, "torch", **CFG)
    same, _ = ours(batch, "torch", **CFG, loss_type="sigmoid")
    compare(same, base, 0.0, 0.0)  # bit for bit
    for loss_type in ("label_smoothing", "robust"):  # ε = 0: both are DPO's sigmoid loss
        got, _ = ours(batch, "torch", **CFG, loss_type=loss_type)
        compare(got, base, 1e-7, 1e-6, f"[{loss_type}] ")
    assert FiReMPOLoss().loss_type == "sigmoid" and "loss_type='sigmoid'" in repr(FiReMPOLoss())


def test_ipo_all_zero_masks_are_finite():
    """An example whose masks are all zero has R = 0 and Σm = 0: its ipo term is (1/(2β))²,
    never 0/0."""
    batch = make_batch(mask="binary", corrupt=(0, 0, 0))
    for k, s in batch["seqs"].items():
        m = s.mask.clone()
        m[1] = 0
        batch["seqs"][k] = s._replace(mask=m)
    got, _ = ours(batch, "torch", beta=0.25, gamma=0.0, alpha=0.0, loss_type="ipo")
    assert float(got["rank"][1]) == pytest.approx(4.0)
    assert torch.isfinite(got["d_chosen"]).all() and not got["d_chosen"][1].any()


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(loss_type="kto"), "loss_type must be one of sigmoid, hinge, ipo, robust, "
         "label_smoothing, exo_pair, nca_pair; got 'kto'"),
        (dict(loss_type="exo_pair"), "exo_pair.*label_smoothing > 0"),
        (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(loss_type="label_smoothing", label_smoothing=-0.1), "label_smoothing must be in"),
        (dict(label_smoothing=float("nan")), "label_smoothing must be a finite number"),
        (dict(label_smoothing="0.1"), "label_smoothing must be a finite number"),
    ],
)  # fmt: skip
def test_bad_loss_type_or_smoothing_is_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FiReMPOLoss(**kw)
    with pytest.raises(ValueError, match=msg):
        FiReMPOLoss.preset("dpo", **kw)


# ---------------------------------------------------------------- the trainer's config


def test_config_exposes_loss_type(tmp_path):
    from fgpo.train import TrainConfig
    from fgpo.train.state import _config_changes

    cfg = TrainConfig.from_yaml("tiny", ["preset=rrpo", "loss_type=robust", "label_smoothing=0.1"])
    kw = cfg.loss_kwargs()
    assert (kw["loss_type"], kw["label_smoothing"]) == ("robust", 0.1)
    loss = fk.FiReMPOLoss(**kw)
    assert (loss.loss_type, loss.label_smoothing, loss.lambda_) == ("robust", 0.1, 1.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        TrainConfig(loss_type="dpo")
    with pytest.raises(ValueError, match="exo_pair"):
        TrainConfig(loss_type="exo_pair")
    with pytest.raises(ValueError, match="label_smoothing must be"):
        TrainConfig(label_smoothing=0.5)
    # --resume refuses a checkpoint of another loss type or ε (a checkpoint written before the
    # fields existed counts as the defaults)
    saved = TrainConfig.from_yaml("tiny").to_dict()
    assert _config_changes(saved, cfg) == [
        "preset: 'fire_mpo' -> 'rrpo'", "loss_type: 'sigmoid' -> 'robust'",
        "label_smoothing: 0.0 -> 0.1",
    ]  # fmt: skip
    old = {k: v for k, v in saved.items() if k not in ("loss_type", "label_smoothing")}
    assert _config_changes(old, TrainConfig.from_yaml("tiny")) == []


def test_visual_loss_type_applies_to_has_corrupt_weighted_examples():
    """``has_corrupt`` weights the visual term of every loss type (hinge here) and zeroes the
    gradients of examples without a corrupted image."""
    batch = make_batch(mask="binary", corrupt=(1, 0, 1))
    got, _ = ours(batch, "torch", gamma=0.5, loss_type="hinge")
    assert got["visual"][1] == 0 and not got["d_rejected_corrupt"][1].any()
    w, _, seqs = cast_seqs(batch, torch.float32, grad=False)
    one = FiReMPOLoss(impl="torch", gamma=0.5, loss_type="hinge")(
        w, *(SequenceStates(*(x[[0]] for x in seqs[k][:4])) for k in NAMES)
    )
    torch.testing.assert_close(one.visual, got["visual"][[0]].to(DEV))


def test_readme_preset_table_matches_the_presets():
    """The README's table states each preset's λ, γ, α and default loss type: the values the
    loss and the trainer use (a preset added or changed without its row fails here)."""
    import pathlib

    from fgpo.train.config import PRESETS

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Presets and loss types", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`"):
            rows[cells[0].split("`")[1]] = cells
    assert set(rows) == set(PRESETS)
    for name in fk.LOSS_PRESETS:
        loss = FiReMPOLoss.preset(name)
        lam, gamma, alpha = (float(rows[name][i].split()[0]) for i in (3, 4, 5))
        assert (lam, gamma, alpha) == (loss.lambda_, loss.gamma, loss.alpha), name
        assert rows[name][6] == f"`{loss.loss_type}`", name
    assert "every response token of y+" in rows["rrpo"][2] and PRESETS["rrpo"]["kl_mask"]
