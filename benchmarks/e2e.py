"""End-to-end benchmark: the loss part of one FiRe-MPO training step.

A step sees 8 forward passes' worth of hidden states: 4 sequences per example (v, y+), (v, y−),
(v', y+), (v', y−), each through the policy and the frozen reference. The backbone is not run
(it is the same for both ways); its last hidden states are random tensors of the model's shape,
the LM head is a random ``(V, D)`` weight built from the model's config (hidden_size,
vocab_size), and the policy hidden states are leaves that receive the gradient, as the
backbone's output would.

Two ways to get from there to ``loss.backward()``:

- ``materialized``: what a straightforward trainer does: full-vocabulary logits for every
  position of every pass (``(B, L, V)`` each, upcast to fp32), ``log_softmax``, gather, masked
  sums, the token-wise KL from the full distributions on (v, y+).
- ours (``torch`` / ``triton`` / ``cuda``): ``fgpo_kernels.FiReMPOLoss`` with that impl; it
  projects only the span-masked positions, in one fused pass over the head.

Both compute the same objective (checked by ``tests/test_benchmarks_smoke.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SEQ_NAMES = ("chosen", "rejected", "chosen_corrupt", "rejected_corrupt")
IGNORE = -100


class Seq(NamedTuple):
    policy: torch.Tensor
    ref: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def make_inputs(b, seq_len, resp, span, d, v, dtype, device, grad_w=False, seed=0):
    """Random hidden states, targets and span masks for the 4 sequences, plus the head."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    weight = randn(v, d, scale=2.0 / d**0.5).requires_grad_(grad_w)
    seqs = {}
    prompt = seq_len - resp
    for name in SEQ_NAMES:
        targets = torch.randint(0, v, (b, seq_len), generator=g)
        targets[:, :prompt] = IGNORE  # image + question tokens: no target
        mask = torch.zeros(b, seq_len)
        for i in range(b):
            start = prompt + int(torch.randint(0, resp - span + 1, (1,), generator=g))
            mask[i, start : start + span] = 1.0
        pol = randn(b, seq_len, d).requires_grad_(True)
        ref = randn(b, seq_len, d)
        seqs[name] = Seq(pol, ref, targets.to(device), mask.to(device))
    has_corrupt = torch.ones(b, device=device)
    return weight, seqs, has_corrupt


def materialized_step(
    weight, seqs, has_corrupt, beta=0.1, alpha=0.01, gamma=0.1, lambda_=0.5
) -> torch.Tensor:
    """The FiRe-MPO loss the straightforward way: full logits for every position."""
    rewards, kl = {}, None
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32  # logits upcast
    for name in SEQ_NAMES:
        s = seqs[name]
        logp = torch.log_softmax((s.policy @ weight.T).to(acc), dim=-1)
        with torch.no_grad():
            logr = torch.log_softmax((s.ref @ weight.detach().T).to(acc), dim=-1)
        valid = s.targets != IGNORE
        idx = s.targets.clamp(min=0).unsqueeze(-1)
        rho = logp.gather(-1, idx).squeeze(-1) - logr.gather(-1, idx).squeeze(-1)
        m = s.mask.to(acc) * valid
        rewards[name] = (m * rho).sum(-1)
        if name == "chosen":
            p, r = logp.exp(), logr.exp()
            fkl = (r * (logr - logp)).sum(-1)
            rkl = (p * (logp - logr)).sum(-1)
            kl = (m * (lambda_ * fkl + (1 - lambda_) * rkl)).sum(-1)
    rank = -F.logsigmoid(beta * (rewards["chosen"] - rewards["rejected"]))
    visual = -has_corrupt * F.logsigmoid(
        beta * (rewards["rejected_corrupt"] - rewards["chosen_corrupt"])
    )
    return (rank + gamma * visual + alpha * kl).mean()


def ours_step(weight, seqs, has_corrupt, impl, **coef) -> torch.Tensor:
    """The same loss through ``fgpo_kernels.FiReMPOLoss`` (public API only)."""
    import fgpo_kernels as fk

    loss_fn = fk.FiReMPOLoss(impl=impl, **coef)
    states = {k: fk.SequenceStates(*seqs[k]) for k in SEQ_NAMES}
    out = loss_fn(
        weight,
        states["chosen"],
        states["rejected"],
        states["chosen_corrupt"],
        states["rejected_corrupt"],
        has_corrupt,
    )
    return out.loss


def leaves(weight, seqs) -> list[torch.Tensor]:
    """Tensors whose .grad the step fills (cleared between iterations)."""
    out = [s.policy for s in seqs.values()]
    return [*out, weight] if weight.requires_grad else out
