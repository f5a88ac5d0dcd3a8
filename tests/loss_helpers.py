"""Shared helpers of the FiReMPOLoss tests: random batches, the float64 materialized objective
(the definition), our loss on the same batch, and a harness that runs TRL's own DPO loss code.

Tests import them as ``from loss_helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fgpo_kernels as fk
from fgpo_kernels import FiReMPOLoss, SequenceStates, _registry

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("chosen", "rejected", "chosen_corrupt", "rejected_corrupt")


def _impls() -> list:
    out = [pytest.param("reference", id="reference")]
    for name in ("torch", "triton", "cuda"):
        ok, why = _registry._usable_on(name, torch.device(DEV))
        out.append(pytest.param(name, marks=[] if ok else [pytest.mark.skip(reason=why)], id=name))
    return out


IMPLS = _impls()


# ---------------------------------------------------------------- random batches


def make_batch(b=3, seq_len=None, d=None, v=None, mask="binary", d_ref=None, corrupt=(1, 0, 1)):
    """Four sequences of float64 states (policy ≈ reference + noise), masks, targets with
    ignore_index at some weight-0 positions, a has_corrupt switch and the head weight(s)."""
    seq_len = seq_len or int(torch.randint(7, 14, ()))
    d = d or int(torch.randint(24, 49, ()))
    v = v or int(torch.randint(500, 1004, ()))
    w = torch.randn(v, d, dtype=torch.float64) / math.sqrt(d) * 3
    wr = (
        None if d_ref is None else torch.randn(v, d_ref, dtype=torch.float64) / math.sqrt(d_ref) * 3
    )
    seqs = {}
    for name in NAMES:
        pol = torch.randn(b, seq_len, d, dtype=torch.float64)
        ref = pol + 0.3 * torch.randn_like(pol) if wr is None else torch.randn(b, seq_len, d_ref)
        tgt = torch.randint(0, v, (b, seq_len))
        if mask == "binary":
            m = (torch.rand(b, seq_len) < 0.5).double()
        else:  # token weights: edited tokens 5, others 1, some 0
            m = torch.where(torch.rand(b, seq_len) < 0.3, 5.0, 1.0).double()
            m = m * (torch.rand(b, seq_len) < 0.8)
        m[:, 0] = 1.0  # at least one weighted position per example
        tgt[(m == 0) & (torch.rand(b, seq_len) < 0.5)] = -100
        seqs[name] = SequenceStates(pol, ref.double(), tgt, m)
    hc = torch.tensor(corrupt[:b], dtype=torch.bool)
    return dict(w=w, wr=wr, seqs=seqs, has_corrupt=hc)


def cast_seqs(batch, dtype, grad=True):
    """Fresh leaf copies in ``dtype`` (policy states and the weight require grad)."""
    cp = lambda x: x.detach().to(device=DEV, dtype=dtype, copy=True)
    w = cp(batch["w"]).requires_grad_(grad)
    wr = None if batch["wr"] is None else cp(batch["wr"])
    seqs = {}
    for k, s in batch["seqs"].items():
        kl = None if s.kl_mask is None else s.kl_mask.to(DEV)
        seqs[k] = SequenceStates(
            cp(s.policy).requires_grad_(grad), cp(s.ref), s.targets.to(DEV), s.mask.to(DEV), kl
        )
    return w, wr, seqs


# ---------------------------------------------------------------- the definition (float64)


def sigmoid_pair(beta):
    """DPO's −log σ(β (R_w − R_l)): the default pairwise loss of ``materialized``."""
    return lambda r_w, r_l, n_w, n_l: -F.logsigmoid(beta * (r_w - r_l))


def materialized(batch, beta, alpha, gamma, lambda_, alpha_v1=0.0, alpha_v2=0.0, pair=None):
    """The whole FiRe-MPO objective from full logits, autograd for the gradients. ``pair``:
    the pairwise loss ``(R_w, R_l, Σm_w, Σm_l) -> (B,)`` (default sigmoid DPO). The KL reads
    the chosen sequence's ``kl_mask`` when it has one."""
    pair = pair or sigmoid_pair(beta)
    w, wr, seqs = cast_seqs(batch, torch.float64)
    wref = w.detach() if wr is None else wr
    hc = batch["has_corrupt"].double().to(DEV)
    big_r, kl, n = {}, {}, {}
    for k, s in seqs.items():
        logp = torch.log_softmax(s.policy @ w.T, -1)
        logr = torch.log_softmax(s.ref @ wref.T, -1)
        t = s.targets.clamp(min=0).unsqueeze(-1)
        rho = logp.gather(-1, t).squeeze(-1) - logr.gather(-1, t).squeeze(-1)
        m = s.mask.double()
        big_r[k] = (m * rho).sum(1)
        n[k] = m.sum(1)
        fkl = (logr.exp() * (logr - logp)).sum(-1)
        rkl = (logp.exp() * (logp - logr)).sum(-1)
        km = m if s.kl_mask is None else s.kl_mask.double()
        kl[k] = (km * (lambda_ * fkl + (1 - lambda_) * rkl)).sum(1)
    rc, rr, rcc, rrc = (big_r[k] for k in NAMES)
    nc, nr, ncc, nrc = (n[k] for k in NAMES)
    rank = pair(rc, rr, nc, nr)
    visual = hc * pair(rrc, rcc, nrc, ncc)
    v1 = hc * pair(rc, rcc, nc, ncc)
    v2 = hc * pair(rc, rrc, nc, nrc)
    term = rank + gamma * visual + alpha * kl["chosen"] + alpha_v1 * v1 + alpha_v2 * v2
    loss = term.mean()
    loss.backward()
    res = dict(
        loss=loss.detach(), rank=rank.detach(), visual=visual.detach(),
        mixed_kl=kl["chosen"].detach(), chosen_rewards=(beta * rc).detach(),
        rejected_rewards=(beta * rr).detach(), visual_v1=v1.detach(), visual_v2=v2.detach(),
        dw=w.grad,
    )  # fmt: skip
    for k, s in seqs.items():
        res["d_" + k] = s.policy.grad
    return res


def ours(batch, impl, dtype=torch.float32, loss_fn=None, **cfg):
    loss_fn = loss_fn or FiReMPOLoss(impl=impl, **cfg)
    w, wr, seqs = cast_seqs(batch, dtype)
    out = loss_fn(w, *(seqs[k] for k in NAMES), has_corrupt=batch["has_corrupt"].to(DEV),
                  ref_weight=wr)  # fmt: skip
    out.loss.backward()
    res = {k: getattr(out, k).detach() for k in ("loss", "rank", "visual", "mixed_kl",
           "chosen_rewards", "rejected_rewards", "visual_v1", "visual_v2")}  # fmt: skip
    res["dw"] = w.grad
    for k, s in seqs.items():
        res["d_" + k] = s.policy.grad if s.policy.grad is not None else torch.zeros_like(s.policy)
    return res, out


# ---------------------------------------------------------------- DPO data and TRL


def summed_logps(batch, name, model):
    """Per-token log-probs of one sequence under the policy or the reference (0 where the mask
    is 0), from the reference impl."""
    s = batch["seqs"][name]
    h = s.policy if model == "policy" else s.ref
    w = batch["w"]
    lp = fk.token_logprobs(h, w, s.targets.masked_fill(s.mask == 0, -100), impl="reference")
    return lp


def response_mask_batch(lengths=None):
    """DPO data: the mask is the whole response (ones, then padding). ``lengths``: per example
    the number of response positions (default: all but the last two)."""
    batch = make_batch(mask="binary")
    for k, s in batch["seqs"].items():
        seq_len = s.mask.shape[1]
        n = lengths or [seq_len - 2] * s.mask.shape[0]
        m = (torch.arange(seq_len) < torch.tensor(n).unsqueeze(1)).double()
        t = s.targets.clamp(min=0).masked_fill(m == 0, -100)
        batch["seqs"][k] = s._replace(mask=m, targets=t)
    return batch


def trl_dpo_loss(loss_type, beta, per_token_c, per_token_r, ref_c, ref_r, mask_c, mask_r,
                 label_smoothing=0.0):  # fmt: skip
    """TRL's own DPO loss of ``loss_type`` (DPOTrainer._compute_loss) fed with our per-token
    log-probs and response masks through a stand-in model; skips when TRL or that private
    method is not as expected."""
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    fn = getattr(dpo.DPOTrainer, "_compute_loss", None)
    if fn is None:
        pytest.skip("trl.DPOTrainer._compute_loss not found in this TRL version")
    per_token = torch.cat([per_token_c, per_token_r])
    n, seq_len = per_token.shape
    zeros = torch.zeros_like(per_token)
    # TRL's completion mask covers the input ids (one more than the targets: the prompt's
    # last token leads); ipo divides by its per-sequence sum.
    completion = torch.cat([torch.zeros(n, 1), torch.cat([mask_c, mask_r]).cpu()], 1).long()

    def model(**kw):
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())  # fmt: skip

    ident = lambda x: x
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=per_token.device, gather=ident, gather_for_metrics=ident
        ),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(n, seq_len + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, seq_len + 1, dtype=torch.long),
        "completion_mask": completion.to(per_token.device),
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    try:
        return fn(trainer, model, inputs, False)
    except (AttributeError, KeyError, TypeError) as exc:
        pytest.skip(f"TRL's private DPOTrainer._compute_loss changed: {exc!r}")
