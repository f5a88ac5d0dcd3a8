"""The straightforward way, as a mode of the same trainer: full-vocabulary logits everywhere.

``MaterializedTrainer`` is ``fgpo.train.Trainer`` with two steps replaced, everything else
(loading, LoRA, checkpointing, data, accumulation, clipping, AdamW) its own. It does what the
method's reference implementation (``shayan80emzed/FiRe-MPO``, a TRL ``DPOTrainer`` subclass)
does for a micro-batch:

- ``forward``: the Hub model's full forward (``lm_head`` included) on every sequence, reference
  (adapters off, no grad) and policy, so the logits of every position (image and prompt tokens
  too) of all eight passes, (v, y+), (v, y-), (v', y+), (v', y-) through policy and reference,
  exist at once: ``(4B, L, V)`` each. They are fp32: the reference runs under Accelerate's bf16
  mixed precision, whose model wrapper casts every output to fp32 (``convert_outputs_to_fp32``).
- ``compute_loss``: per-token log-probs of the targets the way TRL's ``selective_log_softmax``
  takes them from fp32 logits (gather minus a row-by-row ``logsumexp``), the same span-masked
  rewards, rank and visual terms, and the token-wise KL from the full distributions on the
  chosen (v, y+) sequences as the reference computes it: ``log_softmax`` of both logits and the
  ``p * (log p - log q)`` sum, once for KL(ref || policy) and once for KL(policy || ref).

It computes the same objective as ``FiReMPOLoss`` (``tests/test_memory_model.py`` checks the
loss and the gradients on a tiny model). Left out: the reference's logged mean logits (a
boolean gather of the span rows, a few rows x V).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fgpo import models as M
from fgpo.train import Trainer


class _Output(NamedTuple):
    loss: Tensor
    metrics: dict[str, Tensor]


def full_logits(model: torch.nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Logits of every position, fp32 (as the mixed-precision wrapper returns them)."""
    return model(**inputs, use_cache=False).logits.float()


def selective_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position: the gathered logit minus a ``logsumexp`` taken
    one sequence at a time (TRL's fp32 route, which keeps no extra (L, V) tensor per row)."""
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def token_wise_kl(logits_p: Tensor, logits_q: Tensor, mask: Tensor) -> Tensor:
    """Per sequence, sum over masked positions of KL(p || q) from full distributions."""
    log_p, log_q = F.log_softmax(logits_p, -1), F.log_softmax(logits_q, -1)
    return ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum(-1)


class MaterializedTrainer(Trainer):
    """``Trainer`` whose forward keeps full logits and whose loss uses them (module doc)."""

    def forward(self, b: dict[str, Any]):
        inputs = self._model_inputs(b)
        with M.reference_context(self.model) as ref:
            ref_logits = full_logits(ref, dict(inputs))
        return full_logits(self.model, inputs), ref_logits, None, None

    def compute_loss(self, b: dict[str, Any], logits, ref_logits, w, w_ref) -> _Output:
        kw = self.cfg.loss_kwargs()
        beta, alpha, gamma, lam = kw["beta"], kw["alpha"], kw["gamma"], kw["lambda_"]
        bsz, n_seq = b["batch_size"], b["n_seq"]
        targets = b["targets"].to(logits.device)
        mask = b[self.mask_key].to(logits.device, torch.float32)
        with torch.no_grad():
            ref_logps = selective_logps(ref_logits, targets)
        rewards = (mask * (selective_logps(logits, targets) - ref_logps)).sum(-1)
        rewards = rewards.view(n_seq, bsz)
        rank = -F.logsigmoid(beta * (rewards[0] - rewards[1]))
        fkl = token_wise_kl(ref_logits[:bsz], logits[:bsz], mask[:bsz])
        rkl = token_wise_kl(logits[:bsz], ref_logits[:bsz], mask[:bsz])
        kl = lam * fkl + (1 - lam) * rkl
        term = rank + alpha * kl
        if n_seq == 4:
            gate = b["has_corrupt"].to(logits.device, torch.float32)
            term = term + gamma * gate * -F.logsigmoid(beta * (rewards[3] - rewards[2]))
        metrics = {"loss/rank": rank.detach(), "kl/mixed": kl.detach()}
        return _Output(term.sum(), metrics)
