"""The definition: materialized (rows x vocabulary) logits, differentiated by autograd.

Used by tests as the ground truth (on float64 inputs) and as the "materialized path" that the
benchmarks compare against. It allocates several N x V tensors; never use it for training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import acc_dtype


def token_stats(
    h: Tensor,
    hr: Tensor | None,
    w: Tensor,
    wr: Tensor | None,
    targets: Tensor | None,
    temperature: float,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row (fkl, rkl, logp, logp_ref) from full logits.

    ``targets`` holds a vocabulary index or -1 (no target) per row; ``hr is None`` means
    log-prob-only (fkl, rkl, logp_ref are None). The matmul runs in the input dtype (as a plain
    PyTorch implementation would), everything after it in float32 (float64 for float64 input).
    """
    acc = acc_dtype(h)
    logp = torch.log_softmax((h @ w.T).to(acc) / temperature, dim=-1)
    lp = _gather(logp, targets)
    if hr is None:
        return None, None, lp, None
    wr = w if wr is None else wr
    logr = torch.log_softmax((hr @ wr.T).to(acc) / temperature, dim=-1)
    p, r = logp.exp(), logr.exp()
    rkl = (p * (logp - logr)).sum(-1)
    fkl = (r * (logr - logp)).sum(-1)
    return fkl, rkl, lp, _gather(logr, targets)


def _gather(logp: Tensor, targets: Tensor | None) -> Tensor | None:
    if targets is None:
        return None
    valid = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))
