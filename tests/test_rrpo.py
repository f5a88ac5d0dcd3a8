"""``kl_mask`` and the ``rrpo`` preset: RRPO (pritamqu/RRPO) rewards the phrase-masked log-ratio
but regularises with the forward KL over every response token of y+. Against a float64
transcription of RRPO's objective, on every impl; the rows projected; bad ``kl_mask`` values;
the trainer's ``preset: rrpo`` end to end on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compare
from loss_helpers import DEV, IMPLS, NAMES, cast_seqs, make_batch, ours
from train_helpers import make_cfg, make_trainer

import fgpo_kernels as fk
from fgpo_kernels import FiReMPOLoss, SequenceStates

# ---------------------------------------------------------------- RRPO's objective (float64)


def rrpo_transcribed(w, chosen, rejected, alpha=0.01, beta=0.1) -> dict:
    """RRPO's loss in our words. Each sequence is (policy states, reference states, labels with
    -100 off the response, phrase ids with 0 off the phrases), already aligned. Per phrase, the
    policy-minus-reference log-prob of its tokens is summed; the example's margin is the sum
    over phrases of chosen minus rejected; the KL is KL(ref‖policy) of the full next-token
    distributions summed over every labelled token of the chosen answer (not the phrases);
    loss = −log σ(β·margin) + α·KL per example, averaged over the batch. The reference is
    frozen (its head gets no gradient)."""
    phrases = {}
    kl = None
    for name, (h, hr, labels, ids) in (("chosen", chosen), ("rejected", rejected)):
        logp = torch.log_softmax(h @ w.T, -1)
        logr = torch.log_softmax(hr @ w.detach().T, -1)
        y = labels.clamp(min=0).unsqueeze(-1)
        margin_t = (logp.gather(-1, y) - logr.gather(-1, y)).squeeze(-1)
        ids_all = sorted({int(i) for i in torch.cat([chosen[3], rejected[3]]).unique()} - {0})
        phrases[name] = torch.stack(
            [(margin_t * (ids == i)).sum(-1) for i in ids_all], -1
        ) if ids_all else margin_t[:, :0]  # fmt: skip
        if name == "chosen":
            kl_t = (logr.exp() * (logr - logp)).sum(-1)
            kl = (kl_t * (labels != -100)).sum(-1)
    margin = (phrases["chosen"] - phrases["rejected"]).sum(-1)
    per_example = -F.logsigmoid(beta * margin) + alpha * kl
    return dict(
        loss=per_example.mean(), kl=kl,
        chosen_rewards=beta * phrases["chosen"].sum(-1),
        rejected_rewards=beta * phrases["rejected"].sum(-1),
    )  # fmt: skip


def rrpo_batch(b=4, seq_len=13, d=27, v=401, seed=0):
    """Prompt positions (-100), responses of different lengths, padding (-100); up to three
    phrases per answer with ids shared across the batch; example 2's chosen and example 3's
    rejected answer have no phrase at all."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3
    seqs = {}
    for name in ("chosen", "rejected"):
        h = torch.randn(b, seq_len, d, generator=g, dtype=torch.float64)
        hr = h + 0.3 * torch.randn(b, seq_len, d, generator=g, dtype=torch.float64)
        labels = torch.randint(0, v, (b, seq_len), generator=g)
        pos = torch.arange(seq_len)
        start = torch.tensor([2, 3, 1, 4])[:b].unsqueeze(1)
        end = torch.tensor([11, 13, 9, 12])[:b].unsqueeze(1)
        labels[(pos < start) | (pos >= end)] = -100
        ids = torch.randint(0, 4, (b, seq_len), generator=g) * (labels != -100)
        ids[2 if name == "chosen" else 3] = 0
        seqs[name] = (h, hr, labels, ids)
    return w, seqs


def as_states(seq, dtype, kl_response=True):
    h, hr, labels, ids = seq
    kl = (labels != -100).to(dtype) if kl_response else None
    return SequenceStates(h.to(DEV, dtype).requires_grad_(), hr.to(DEV, dtype), labels.to(DEV),
                          (ids > 0).to(DEV, dtype), None if kl is None else kl.to(DEV))  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_rrpo_preset_reproduces_rrpo(impl):
    w64, seqs = rrpo_batch()
    w = w64.clone().requires_grad_()
    t = {k: (s[0].clone().requires_grad_(), *s[1:]) for k, s in seqs.items()}
    want = rrpo_transcribed(w, t["chosen"], t["rejected"])
    want["loss"].backward()
    dtype, tol = (torch.float64, 1e-10) if impl == "reference" else (torch.float32, 5e-5)
    wo = w64.to(DEV, dtype).requires_grad_()
    c, r = (as_states(seqs[k], dtype) for k in ("chosen", "rejected"))
    out = FiReMPOLoss.preset("rrpo", impl=impl)(wo, c, r)
    out.loss.backward()
    got = dict(loss=out.loss, kl=out.metrics["kl/forward"], chosen_rewards=out.chosen_rewards,
               rejected_rewards=out.rejected_rewards, dw=wo.grad, d_chosen=c.policy.grad,
               d_rejected=r.policy.grad)  # fmt: skip
    ref = {k: want[k].detach() for k in ("loss", "kl", "chosen_rewards", "rejected_rewards")}
    ref.update(dw=w.grad, d_chosen=t["chosen"][0].grad, d_rejected=t["rejected"][0].grad)
    compare({k: v.detach() for k, v in got.items()}, ref, tol, 2 * tol, f"[{impl}] ")
    # The preset's coefficients are RRPO's defaults (its run script: alpha 0.01, beta 0.1).
    assert (out.mixed_kl.detach() == out.metrics["kl/forward"]).all()


def test_span_only_kl_is_not_rrpo():
    """Without ``kl_mask`` the KL reads the phrases only: a different objective."""
    w64, seqs = rrpo_batch()
    c, r = (as_states(seqs[k], torch.float64, kl_response=False) for k in ("chosen", "rejected"))
    out = FiReMPOLoss.preset("rrpo", impl="reference")(w64, c, r)
    want = rrpo_transcribed(w64, seqs["chosen"], seqs["rejected"])
    assert float((out.metrics["kl/forward"] - want["kl"].detach()).abs().min()) > 1e-3


def test_kl_mask_none_is_mask_and_four_fields_still_work():
    batch = make_batch(mask="weights")
    a, _ = ours(batch, "torch", alpha=0.3)
    for k in NAMES:
        s = batch["seqs"][k]
        batch["seqs"][k] = SequenceStates(s.policy, s.ref, s.targets, s.mask, s.mask.clone())
    b, _ = ours(batch, "torch", alpha=0.3)
    compare(b, a, 0.0, 0.0)  # bit for bit
    assert SequenceStates(*range(4)).kl_mask is None


def test_rows_projected_are_the_union_on_the_chosen_sequence(monkeypatch):
    """ONE token_kl call over the rows with a reward weight, plus the chosen rows with only a
    KL weight; a KL-only row may have no target (ignore_index) and leaves the rewards alone."""
    batch = make_batch(mask="binary")
    c = batch["seqs"]["chosen"]
    kl = torch.ones_like(c.mask)
    kl[:, -1] = 0
    kl_only = (kl != 0) & (c.mask == 0)
    batch["seqs"]["chosen"] = c._replace(kl_mask=kl)
    calls = []
    real = fk.loss.token_kl
    monkeypatch.setattr(fk.loss, "token_kl", lambda h, *a, **kw: calls.append(h.shape[0]) or
                        real(h, *a, **kw))  # fmt: skip
    got, _ = ours(batch, "torch", gamma=0.0, alpha=0.2)
    seqs = batch["seqs"]
    assert calls == [int(((seqs["chosen"].mask != 0) | (kl != 0)).sum() +
                         (seqs["rejected"].mask != 0).sum())]  # fmt: skip
    assert (c.targets[kl_only] == -100).any()  # make_batch leaves some weight-0 rows without one
    base, _ = ours(dict(batch, seqs=dict(seqs, chosen=c)), "torch", gamma=0.0, alpha=0.2)
    torch.testing.assert_close(got["chosen_rewards"], base["chosen_rewards"], rtol=0, atol=0)
    assert (got["mixed_kl"] > base["mixed_kl"]).all()


@pytest.mark.parametrize(
    "bad,exc,msg",
    [
        (lambda m: m[:, :-1], ValueError, r"chosen.kl_mask must have shape \(B, L\)"),
        (lambda m: m.to(torch.complex64), TypeError, "chosen.kl_mask must be bool or real"),
        (lambda m: m - 2, ValueError, "chosen.kl_mask must be >= 0"),
        (lambda m: m * float("nan"), ValueError, "chosen.kl_mask must be finite"),
        (lambda m: m.to("meta"), ValueError, "chosen.kl_mask is on (the )?meta"),
        (lambda m: [1.0], TypeError, "chosen.kl_mask must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_bad_kl_mask_is_refused(bad, exc, msg):
    batch = make_batch(b=2, seq_len=7, d=24, v=300, corrupt=(0, 0))
    w, _, seqs = cast_seqs(batch, torch.float32, grad=False)
    c = seqs["chosen"]
    with pytest.raises(exc, match=msg):
        FiReMPOLoss(impl="torch")(w, c._replace(kl_mask=bad(c.mask)), seqs["rejected"])


def test_kl_only_rows_need_targets_in_range():
    batch = make_batch(b=2, seq_len=7, d=24, v=300, corrupt=(0, 0))
    w, _, seqs = cast_seqs(batch, torch.float32, grad=False)
    c = seqs["chosen"]
    t = c.targets.clone()
    t[c.mask == 0] = 300  # not ignore_index, not a token id
    with pytest.raises(ValueError, match=r"chosen.targets must be in \[0, V=300\) where "
                       r"chosen.kl_mask is nonzero \(or ignore_index\)"):  # fmt: skip
        FiReMPOLoss(impl="torch", gamma=0)(
            w, c._replace(targets=t, kl_mask=torch.ones_like(c.mask)), seqs["rejected"]
        )


# ---------------------------------------------------------------- the trainer


pytest_train = pytest.mark.usefixtures("train_env")


@pytest_train
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_trainer_rrpo_is_rrpo_on_its_hidden_states(tmp_path, prefs, llava, shared_prefix):
    """``preset: rrpo``: the span mask for the reward, every response token of y+ for the KL.
    With the adapters moved away from the reference, the trainer's loss on a micro-batch equals
    RRPO's objective transcribed from the same hidden states (labels = the batch targets), in
    both forward modes."""
    cfg = make_cfg(tmp_path, prefs, preset="rrpo", micro_batch_size=4, shared_prefix=shared_prefix)
    assert cfg.resolved_kl_mask() == "response"
    assert make_cfg(tmp_path, prefs).resolved_kl_mask() is None
    tr = make_trainer(cfg, llava)
    tr.load()
    tr.load_data()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    b = tr.encode(0)[0]
    h, h_ref, w, w_ref = tr.forward(b)
    out = tr.compute_loss(b, h, h_ref, w, w_ref)
    n = b["batch_size"]
    tgt, span = b["targets"], b["span_mask"]
    seq = lambda i: (h[i * n : (i + 1) * n].detach().double(),
                     h_ref[i * n : (i + 1) * n].double(), tgt[i * n : (i + 1) * n],
                     span[i * n : (i + 1) * n].long())  # fmt: skip
    want = rrpo_transcribed(w.detach().double(), seq(0), seq(1))
    assert float(want["kl"].min()) > 1e-4  # the KL matters in this check
    assert float(out.loss) == pytest.approx(float(want["loss"]) * n, rel=1e-5)
    torch.testing.assert_close(out.metrics["kl/forward"].double(), want["kl"], rtol=1e-4, atol=0)
