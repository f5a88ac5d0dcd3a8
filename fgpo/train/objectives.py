"""The objectives the trainer optimises, all from backbone hidden states and the LM-head weight.

- the preference presets (``fire_mpo``, ``dpo``, ``rrpo``, ``mask_dpo``): ``FiReMPOLoss``
  of ``fgpo_kernels`` on the sequences of a micro-batch (``rrpo``: the KL reads every
  response token of y+ through the chosen sequence's ``kl_mask``);
- ``sft``: supervised fine-tuning on the chosen answers, the control every preference method
  must beat on the same examples. Per example, the mean over its response tokens (eos
  included) of ``-log π(y+_t)``, through ``fgpo_kernels.token_logprobs``; no logits tensor.

Both return the per-micro-batch loss SUMMED over examples (the trainer divides by the global
batch) and detached per-example metrics of shape ``(B,)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

import fgpo_kernels as fk

SFT = "sft"


class SFTOutput(NamedTuple):
    loss: Tensor
    metrics: dict[str, Tensor]


class SFTLoss:
    """``sum_i mean_t -log π(y+_t)`` over the examples of a micro-batch (see module doc)."""

    def __init__(self, impl: str | None = None) -> None:
        self.impl = impl

    def __call__(self, weight: Tensor, chosen: fk.SequenceStates, **_: Any) -> SFTOutput:
        mask = chosen.mask.to(torch.float32)
        lp = fk.token_logprobs(chosen.policy, weight, chosen.targets, impl=self.impl)
        total = (lp * mask.to(lp.dtype)).sum(-1)
        n = mask.sum(-1).to(lp.dtype)
        per_example = -total / n.clamp(min=1.0)
        metrics = {"logps/chosen": total.detach(), "loss/sft": per_example.detach()}
        return SFTOutput(per_example.sum(), metrics)


def build_loss(preset: str, loss_kwargs: dict[str, Any]):
    """The objective of a config: ``SFTLoss`` for ``sft``, else ``FiReMPOLoss`` (summed)."""
    if preset == SFT:
        return SFTLoss(impl=loss_kwargs.get("impl"))
    return fk.FiReMPOLoss(**loss_kwargs, reduction="sum")


def split_sequences(
    b: dict[str, Any], h: Tensor, h_ref: Tensor | None, mask_key: str, device,
    kl_key: str | None = None,
) -> list[fk.SequenceStates]:  # fmt: skip
    """The micro-batch's ``n_seq`` groups of ``B`` sequences as ``SequenceStates``, in the
    collator's order: (v, y+), (v, y-), (v', y+), (v', y-). ``kl_key``: the batch mask that
    the chosen group's KL reads (its ``kl_mask``); None = the same as ``mask_key``."""
    bsz, n_seq = b["batch_size"], b["n_seq"]
    targets = b["targets"].to(device)
    mask = b[mask_key].to(device)
    kl = None if kl_key is None else b[kl_key][:bsz].to(device)
    ref = h if h_ref is None else h_ref
    return [
        fk.SequenceStates(
            h[i * bsz : (i + 1) * bsz],
            ref[i * bsz : (i + 1) * bsz],
            targets[i * bsz : (i + 1) * bsz],
            mask[i * bsz : (i + 1) * bsz],
            kl if i == 0 else None,
        )
        for i in range(n_seq)
    ]
