"""The pairwise preference losses of the rank and visual terms (``FiReMPOLoss(loss_type=...)``).

Each term compares a preferred sequence w with a dispreferred one l of the same example through
their span-masked log-ratio sums R_w, R_l (``loss.py``); Δ = R_w − R_l, z = β·Δ, ε =
``label_smoothing``, σ the sigmoid. Each ``loss_type`` is the DPO loss of that name in TRL 1.16
(``trl.trainer.dpo_trainer``), with TRL's token-summed log-ratios replaced by our masked sums:

    sigmoid          −log σ(z)                                   DPO (Rafailov et al. 2023)
    hinge            max(0, 1 − z)                               SLiC-style hinge
    ipo              (R_w/n_w − R_l/n_l − 1/(2β))²               IPO; n = Σ mask (the mean ρ)
    robust           (−(1−ε) log σ(z) + ε log σ(−z)) / (1 − 2ε)  rDPO (unbiased under flips)
    label_smoothing  −(1−ε) log σ(z) − ε log σ(−z)               conservative DPO (cDPO)
    exo_pair         σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)     EXO, needs ε > 0
    nca_pair         −log σ(βR_w) − ½ log σ(−βR_w) − ½ log σ(−βR_l)          NCA (rewards apart)

TRL 1.16 has no loss named ``label_smoothing``: its ``sigmoid`` ignores ε. Ours is the
conservative DPO that TRL's ``sigmoid`` computed with ε > 0 before version 1 (Mitchell 2023).
For ``ipo`` TRL divides by the completion's token count clamped to >= 1; with real token
weights ours divides by their sum, and by 1 where it is 0 (then R is 0 as well).

Everything here is plain torch on per-example (B,) tensors, so autograd gives the gradients;
the fused kernels only ever see per-row scalars (docs/design.md §3.8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "label_smoothing", "exo_pair", "nca_pair")
# The loss types that read ε (``label_smoothing``); the others ignore it.
_USES_EPS = ("robust", "label_smoothing", "exo_pair")


def check_loss_type(loss_type: str, label_smoothing: float) -> None:
    """A known ``loss_type`` and an ε it can use: [0, 0.5), and > 0 for ``exo_pair``."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    eps = label_smoothing
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"label_smoothing must be a finite number, got {eps!r}")
    # ε = 0.5 makes robust divide by 0 and every smoothed loss flat (no preference left).
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    if loss_type == "exo_pair" and eps == 0:
        raise ValueError(
            "loss_type='exo_pair' needs label_smoothing > 0 (its target distribution is "
            "[1 − ε, ε]; log ε is −inf at 0); the EXO paper suggests 1e-3"
        )


def pair_loss(
    loss_type: str, beta: float, eps: float, r_w: Tensor, r_l: Tensor, n_w: Tensor, n_l: Tensor
) -> Tensor:
    """Per-example loss of preferring w over l (module docstring); ``n_*`` are the mask sums
    (read by ``ipo`` only)."""
    if loss_type == "sigmoid":
        # The expression FiReMPOLoss always used, so the default's numbers stay bit for bit.
        return -F.logsigmoid(beta * (r_w - r_l))
    z = beta * (r_w - r_l)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        mean_w = r_w / torch.where(n_w > 0, n_w, torch.ones_like(n_w))
        mean_l = r_l / torch.where(n_l > 0, n_l, torch.ones_like(n_l))
        return (mean_w - mean_l - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "label_smoothing":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == "exo_pair":
        qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
        return qw * (F.logsigmoid(z) - math.log1p(-eps)) + ql * (F.logsigmoid(-z) - math.log(eps))
    if loss_type == "nca_pair":
        bw, bl = beta * r_w, beta * r_l
        return -F.logsigmoid(bw) - 0.5 * F.logsigmoid(-bw) - 0.5 * F.logsigmoid(-bl)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
