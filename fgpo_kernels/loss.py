"""FiRe-MPO objective (docs/design.md §1) from hidden states and the LM-head weight, fused.

Math, per example (m = token weights of a sequence, β = ``beta``, σ = sigmoid):

    ρ_t    = log π(y_t) − log π_ref(y_t)                 R(s) = Σ_t m_t ρ_t   (a sum)
    ℓ(w, l) = −log σ(β [R(w) − R(l)])    (``loss_type="sigmoid"``; others: _pair_losses.py)
    rank   = ℓ((v, y+), (v, y−))
    visual = c · ℓ((v', y−), (v', y+))                   c = has_corrupt (0/1 or a weight)
    v1     = c · ℓ((v, y+), (v', y+))                    (off unless alpha_v1 > 0)
    v2     = c · ℓ((v, y+), (v', y−))                    (off unless alpha_v2 > 0)
    kl     = Σ_t k_t [λ KL(π_ref‖π)_t + (1 − λ) KL(π‖π_ref)_t]   on (v, y+) only
             k = the chosen sequence's ``kl_mask``, by default its ``mask`` m+
    term   = rank + γ·visual + α·kl + alpha_v1·v1 + alpha_v2·v2
    loss   = mean over the batch of term   (``reduction="sum"``: the sum)

Rewards are β·R. The reference model is frozen: no gradient flows through π_ref (its hidden
states are detached, and a shared head weight that requires grad is detached on the reference
side).

Performance design: the rows with a nonzero token weight of every sequence in use (chosen,
rejected, and the corrupted ones when a visual term is on and ``has_corrupt`` is nonzero; for
the chosen sequence a nonzero ``mask`` or ``kl_mask``) are
gathered and concatenated, policy and reference side by side, and go through ONE ``token_kl``
call. The head weight is therefore streamed once per step and positions with weight 0 are never
projected. That call returns per-row log-probs of both models (for ρ) and the two KLs (used at
the chosen rows; at the others they cost only elementwise work).

Normalizer (gradient accumulation): ``reduction="mean"`` divides by the micro-batch size B, so
accumulating k equal-size micro-batches gives the large-batch update when each micro-batch loss
is divided by k. For unequal micro-batches use ``reduction="sum"`` and divide each micro-batch
loss by the global batch size; both give exactly the large-batch mean.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _loss_checks as checks
from . import _registry
from ._autograd import tile_budget
from ._pair_losses import check_loss_type, pair_loss
from ._util import check_fraction, check_index, check_real
from .token_kl import IGNORE_INDEX, TokenKLOutput, token_kl

_REDUCTIONS = ("mean", "sum")


class SequenceStates(NamedTuple):
    """One batch of sequences, already aligned (hidden row t predicts ``targets[:, t]``).

    policy: ``(B, L, D)`` policy hidden states (last layer, after the final norm).
    ref: ``(B, L, D_ref)`` reference hidden states (no gradient flows into them).
    targets: ``(B, L)`` integer token ids; every position with a nonzero mask needs a valid id.
    mask: ``(B, L)`` token weights: bool/0-1 span mask or any real weights (0 = not projected).
    kl_mask: optional ``(B, L)`` token weights of the KL term, >= 0; None = ``mask``. Read on the
        chosen sequence only (the KL is on (v, y+)): RRPO rewards the span but regularises
        every response token. Positions with only a KL weight need no target.
    """

    policy: Tensor
    ref: Tensor
    targets: Tensor
    mask: Tensor
    kl_mask: Tensor | None = None


class FiReMPOOutput(NamedTuple):
    """Result of :class:`FiReMPOLoss`. Per-example tensors have shape ``(B,)``.

    ``loss`` is the scalar to backpropagate. ``rank``, ``visual``, ``mixed_kl``, ``visual_v1``,
    ``visual_v2`` are the per-example terms before their coefficients (``visual``/``v1``/``v2``
    already multiplied by ``has_corrupt``; zeros when their corrupted sequences are not in use,
    i.e. not needed by any term with a nonzero coefficient); they are differentiable.
    ``chosen_rewards``/``rejected_rewards`` are β·R(v, y±) (differentiable).
    ``metrics`` maps names to detached per-example ``(B,)`` tensors (see ``METRIC_KEYS``);
    visual metrics are NaN for examples without a corrupted image. ``summary()`` gives batch
    means as floats (NaN-skipping), ready for a logger.
    """

    loss: Tensor
    rank: Tensor
    visual: Tensor
    mixed_kl: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    visual_v1: Tensor
    visual_v2: Tensor
    metrics: dict[str, Tensor]

    def summary(self) -> dict[str, float]:
        """Batch means of every metric as Python floats.

        The visual metrics skip the examples without a corrupted image (``has_corrupt == 0``:
        their value is NaN by design and their ``visual`` term exactly 0). Any other NaN
        shows in the mean, so a NaN loss never logs finite metrics for the example behind it.
        """
        no_v = self.visual.detach() == 0
        out = {}
        for k, v in self.metrics.items():
            keep = ~(torch.isnan(v) & no_v) if k in VISUAL_METRIC_KEYS else torch.ones_like(no_v)
            out[k] = float(v[keep].mean()) if bool(keep.any()) else float("nan")
        return out


# Metrics always present, then the visual ones (present when a corrupted sequence is in use).
METRIC_KEYS = (
    "rewards/chosen",  # β·R(v, y+)
    "rewards/rejected",  # β·R(v, y−)
    "rewards/margins",  # chosen − rejected
    "rewards/accuracies",  # 1.0 where chosen > rejected
    "logps/chosen",  # Σ m log π(y+ | v)
    "logps/rejected",  # Σ m log π(y− | v)
    "kl/forward",  # Σ k KL(π_ref‖π) on (v, y+)   (k = chosen.kl_mask, default its mask)
    "kl/reverse",  # Σ k KL(π‖π_ref) on (v, y+)
    "kl/mixed",  # Σ k [λ fkl + (1 − λ) rkl]
    "loss/rank",
    "loss/total",  # the per-example term whose batch mean (or sum) is ``loss``
)
VISUAL_METRIC_KEYS = (
    "visual/loss",  # ℓ((v', y−), (v', y+)) before has_corrupt   (NaN where has_corrupt == 0)
    "visual/accuracy",  # 1.0 where R(v', y−) > R(v', y+)
    "visual/margins",  # β [R(v', y−) − R(v', y+)]
    "rewards/chosen_corrupt",  # β·R(v', y+)
    "rewards/rejected_corrupt",  # β·R(v', y−)
)

# The ONE preset table (the trainer reads it too): preset name -> keyword overrides of
# ``FiReMPOLoss``; every coefficient not named keeps its default (docs/design.md §1). DPO and
# Mask-DPO have the same coefficients: they differ in the mask the caller builds (every response
# token for DPO, the edited spans for Mask-DPO). No preset fixes ``loss_type``: each runs with
# any of them (the default ``sigmoid`` is the one the named method uses).
LOSS_PRESETS: dict[str, dict[str, float]] = {
    # Binary mask = all response tokens (built by the caller), γ = 0, α = 0.
    "dpo": dict(gamma=0.0, alpha=0.0),
    # Span mask for the reward, forward KL only, no visual term; RRPO (pritamqu/RRPO) when the
    # caller passes the whole response mask as the chosen sequence's ``kl_mask``.
    "rrpo": dict(gamma=0.0, lambda_=1.0),
    # Span mask, no KL, no visual term.
    "mask_dpo": dict(gamma=0.0, alpha=0.0),
    # The defaults of docs/design.md §1.
    "fire_mpo": dict(),
}


class _Rows(NamedTuple):
    """The weighted rows of every sequence in use, concatenated in ``segs`` order."""

    policy: Tensor  # (R, D)
    ref: Tensor  # (R, D_ref), detached: the reference is frozen
    targets: Tensor  # (R,) int64; ignore_index only at KL-only rows (reward weight 0)
    kl_weight: Tensor  # (R,) the chosen rows' KL weights, 0 elsewhere (KL on (v, y+) only)
    segs: list  # per sequence: (name, example index of each row, reward weight of each row)


class _Sums(NamedTuple):
    """Per-example (B,) sums over the weighted rows of each sequence."""

    reward: dict  # name -> R(s) = Σ m ρ (differentiable)
    logps: dict  # name -> Σ m log π (detached)
    count: dict  # name -> Σ m (the ipo loss takes the mean ρ)
    mixed_kl: Tensor  # Σ k [λ fkl + (1 − λ) rkl] on (v, y+) (differentiable)
    fkl: Tensor  # Σ k fkl (detached)
    rkl: Tensor  # Σ k rkl (detached)


class _Terms(NamedTuple):
    """Per-example (B,) terms of the objective, before the batch reduction."""

    rank: Tensor
    visual: Tensor
    v1: Tensor
    v2: Tensor
    total: Tensor  # rank + α·kl + γ·visual + alpha_v1·v1 + alpha_v2·v2
    visual_pair: Tensor | None  # ℓ((v', y−), (v', y+)) before has_corrupt (its metric)


class FiReMPOLoss(torch.nn.Module):
    """The FiRe-MPO objective (see the module docstring for the math).

    Args:
        beta: β of the sigmoid preference terms (> 0).
        alpha: weight of the token-wise KL on (v, y+).
        gamma: weight of the visual-contrastive term on corrupted images.
        lambda_: mixing of the KL: λ·KL(π_ref‖π) + (1 − λ)·KL(π‖π_ref), in [0, 1].
        alpha_v1: weight of the optional (v, y+) ≻ (v', y+) term.
        alpha_v2: weight of the optional (v, y+) ≻ (v', y−) term.
        impl: ``token_kl`` implementation (None = best available, ``FGPO_IMPL`` overrides).
        tile_budget_mb: MB of logits the fused call may keep to compute gradients in the
            forward (``token_kl``'s argument; None = its default).
        reduction: ``"mean"`` over the batch (default) or ``"sum"`` (see the normalizer note).
        ignore_index: target id meaning "no target"; it must not occur where the mask is nonzero.
        loss_type: the pairwise loss of the rank and every visual term, one of ``LOSS_TYPES``
            (TRL's DPO losses of those names; ``_pair_losses.py``); default ``"sigmoid"``.
        label_smoothing: ε in [0, 0.5) of ``robust``, ``label_smoothing`` (cDPO) and
            ``exo_pair`` (which needs ε > 0); the other loss types ignore it.
    """

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.01,
        gamma: float = 0.1,
        lambda_: float = 0.5,
        alpha_v1: float = 0.0,
        alpha_v2: float = 0.0,
        impl: str | None = None,
        *,
        reduction: str = "mean",
        ignore_index: int = IGNORE_INDEX,
        tile_budget_mb: float | None = None,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_real("beta", beta)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        for name, val in (("alpha", alpha), ("gamma", gamma), ("alpha_v1", alpha_v1),
                          ("alpha_v2", alpha_v2)):  # fmt: skip
            check_real(name, val)
            if val < 0:
                raise ValueError(f"{name} must be >= 0, got {val}")
        check_fraction("lambda_", lambda_)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        _registry.check_name(impl)
        check_index("ignore_index", ignore_index)
        check_loss_type(loss_type, label_smoothing)
        self.loss_type, self.label_smoothing = loss_type, float(label_smoothing)
        self.beta, self.alpha, self.gamma, self.lambda_ = beta, alpha, gamma, lambda_
        self.alpha_v1, self.alpha_v2 = alpha_v1, alpha_v2
        self.impl, self.reduction, self.ignore_index = impl, reduction, ignore_index
        if tile_budget_mb is not None:
            tile_budget(tile_budget_mb, torch.device("cpu"))  # checked here, used per call
        self.tile_budget_mb = tile_budget_mb

    @classmethod
    def preset(cls, name: str, **overrides) -> FiReMPOLoss:
        """A loss from ``LOSS_PRESETS``: ``"dpo"``, ``"rrpo"``, ``"mask_dpo"`` (or
        ``"mask-dpo"``), ``"fire_mpo"`` (or ``"fire-mpo"``), with keyword overrides. DPO and
        Mask-DPO have the same coefficients (γ = 0, α = 0); they differ in the data: for DPO the
        mask passed to ``forward`` must be the whole response mask, for Mask-DPO the span mask.
        For RRPO the chosen sequence's ``kl_mask`` must be its whole response mask (the reward
        reads the span). No preset fixes ``loss_type``; pass it as an override."""
        key = name.lower().replace("-", "_") if isinstance(name, str) else name
        if key not in LOSS_PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(LOSS_PRESETS)}")
        return cls(**{**LOSS_PRESETS[key], **overrides})

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, alpha={self.alpha}, gamma={self.gamma}, lambda_={self.lambda_}, "
            f"alpha_v1={self.alpha_v1}, alpha_v2={self.alpha_v2}, impl={self.impl!r}, "
            f"reduction={self.reduction!r}, loss_type={self.loss_type!r}, "
            f"label_smoothing={self.label_smoothing}"
        )

    def forward(
        self,
        weight: Tensor,
        chosen: SequenceStates,
        rejected: SequenceStates,
        chosen_corrupt: SequenceStates | None = None,
        rejected_corrupt: SequenceStates | None = None,
        has_corrupt: Tensor | None = None,
        *,
        ref_weight: Tensor | None = None,
    ) -> FiReMPOOutput:
        """Compute the objective.

        Args:
            weight: ``(V, D)`` LM-head weight of the policy (e.g. ``model.lm_head.weight``).
            chosen, rejected: :class:`SequenceStates` of (v, y+) and (v, y−).
            chosen_corrupt, rejected_corrupt: (v', y+) and (v', y−); needed when ``gamma``
                (both), ``alpha_v1`` (chosen_corrupt) or ``alpha_v2`` (rejected_corrupt) is
                nonzero, unless ``has_corrupt`` is given and all zero. Ignored otherwise.
            has_corrupt: ``(B,)`` bool or float per-example switch/weight of the visual terms;
                None = all ones when the corrupted sequences are given. Rows of examples with
                ``has_corrupt == 0`` are not projected.
            ref_weight: ``(V, D_ref)`` LM-head weight of a separate reference model; None =
                ``weight`` (the LoRA case).
        """
        seqs, gate = self._check_inputs(
            weight, ref_weight, chosen, rejected, chosen_corrupt, rejected_corrupt, has_corrupt
        )
        rows = _gather_rows(seqs, gate, weight.shape[0], self.ignore_index)
        out = _fused_stats(
            rows, weight, ref_weight, self.lambda_, self.impl, self.tile_budget_mb,
            self.ignore_index,
        )  # fmt: skip
        sums = _per_example_sums(rows, out, seqs["chosen"].policy.shape[0])
        terms = self._terms(sums, gate)
        loss = terms.total.mean() if self.reduction == "mean" else terms.total.sum()
        rc, rr = sums.reward["chosen"], sums.reward["rejected"]
        return FiReMPOOutput(
            loss, terms.rank, terms.visual, sums.mixed_kl, self.beta * rc, self.beta * rr,
            terms.v1, terms.v2, self._metrics(sums, terms, gate),
        )  # fmt: skip

    def _check_inputs(
        self, weight, ref_weight, chosen, rejected, chosen_corrupt, rejected_corrupt, has_corrupt
    ) -> tuple[dict[str, SequenceStates], Tensor | None]:
        """Validate every argument. Returns the sequences in use by name (chosen, rejected, and
        the corrupted ones a term with a nonzero coefficient needs) and the per-example gate of
        the visual terms (None when no visual term is on)."""
        b, _ = checks.check_seq("chosen", chosen, None)
        checks.check_batch(b, self.reduction)
        chosen = SequenceStates(*chosen)
        checks.check_seq("rejected", rejected, chosen)
        seqs = {"chosen": chosen, "rejected": SequenceStates(*rejected)}
        need_cc = self.gamma > 0 or self.alpha_v1 > 0
        need_rc = self.gamma > 0 or self.alpha_v2 > 0
        gate = None
        if need_cc or need_rc:
            gate = checks.corrupt_gate(has_corrupt, b, chosen.policy.device)
            for name, seq, need in (("chosen_corrupt", chosen_corrupt, need_cc),
                                    ("rejected_corrupt", rejected_corrupt, need_rc)):  # fmt: skip
                if not need:
                    continue
                if seq is None:
                    if gate is not None and not bool((gate != 0).any()):
                        continue  # no example has a corrupted image: the term is 0
                    raise checks.missing_corrupt(name, self)
                checks.check_seq(name, seq, chosen)
                seqs[name] = SequenceStates(*seq)
            if gate is None:
                gate = torch.ones(b, device=chosen.policy.device)
        checks.check_weights(weight, ref_weight, chosen)
        return seqs, gate

    def _pair(self, sums: _Sums, win: str, lose: str) -> Tensor:
        """ℓ(win, lose) per example: the ``loss_type`` on the two sequences' sums."""
        r, n = sums.reward, sums.count
        return pair_loss(
            self.loss_type, self.beta, self.label_smoothing, r[win], r[lose], n[win], n[lose]
        )

    def _terms(self, sums: _Sums, gate: Tensor | None) -> _Terms:
        """rank, the visual terms and their weighted sum, per example."""
        rank = self._pair(sums, "chosen", "rejected")
        term = rank + self.alpha * sums.mixed_kl if self.alpha else rank
        visual = v1 = v2 = torch.zeros_like(rank)
        pair_v = None
        g = None if gate is None else gate.to(rank.dtype)
        has_cc, has_rc = "chosen_corrupt" in sums.reward, "rejected_corrupt" in sums.reward
        if has_cc and has_rc:
            pair_v = self._pair(sums, "rejected_corrupt", "chosen_corrupt")
            visual = g * pair_v
            if self.gamma:
                term = term + self.gamma * visual
        if has_cc:
            v1 = g * self._pair(sums, "chosen", "chosen_corrupt")
            if self.alpha_v1:
                term = term + self.alpha_v1 * v1
        if has_rc:
            v2 = g * self._pair(sums, "chosen", "rejected_corrupt")
            if self.alpha_v2:
                term = term + self.alpha_v2 * v2
        return _Terms(rank, visual, v1, v2, term, pair_v)

    def _metrics(self, sums: _Sums, terms: _Terms, gate: Tensor | None) -> dict[str, Tensor]:
        """Detached per-example metrics (``METRIC_KEYS``, plus ``VISUAL_METRIC_KEYS`` when both
        corrupted sequences are in use)."""
        beta = self.beta
        rc, rr = sums.reward["chosen"], sums.reward["rejected"]
        acc = rc.dtype
        cr, rjr = (beta * rc).detach(), (beta * rr).detach()
        metrics = {
            "rewards/chosen": cr,
            "rewards/rejected": rjr,
            "rewards/margins": cr - rjr,
            "rewards/accuracies": (cr > rjr).to(acc),
            "logps/chosen": sums.logps["chosen"],
            "logps/rejected": sums.logps["rejected"],
            "kl/forward": sums.fkl,
            "kl/reverse": sums.rkl,
            "kl/mixed": sums.mixed_kl.detach(),
            "loss/rank": terms.rank.detach(),
            "loss/total": terms.total.detach(),
        }
        rcc, rrc = sums.reward.get("chosen_corrupt"), sums.reward.get("rejected_corrupt")
        if rcc is not None and rrc is not None:
            nan = torch.full_like(cr, math.nan)
            on = gate.to(acc) != 0
            vm = (beta * (rrc - rcc)).detach()
            metrics["visual/loss"] = torch.where(on, terms.visual_pair.detach(), nan)
            metrics["visual/accuracy"] = torch.where(on, (vm > 0).to(acc), nan)
            metrics["visual/margins"] = torch.where(on, vm, nan)
            metrics["rewards/chosen_corrupt"] = torch.where(on, (beta * rcc).detach(), nan)
            metrics["rewards/rejected_corrupt"] = torch.where(on, (beta * rrc).detach(), nan)
        return metrics


def _as_weights(m: Tensor) -> Tensor:
    m = m.detach()
    return m if m.dtype.is_floating_point else m.float()


def _gather_rows(seqs: dict, gate: Tensor | None, v: int, ignore_index: int) -> _Rows:
    """The rows with a nonzero token weight of every sequence in use (of the corrupted ones
    only where ``gate`` is nonzero; of the chosen one, a nonzero mask or KL weight), checked and
    concatenated for one ``token_kl`` call."""
    h_parts, hr_parts, t_parts, kw_parts, segs = [], [], [], [], []
    for name, seq in seqs.items():
        m = _as_weights(seq.mask)
        kl = None
        if name == "chosen":
            kl = m if seq.kl_mask is None else _as_weights(seq.kl_mask)
        active = m != 0 if kl is None or kl is m else (m != 0) | (kl != 0)
        if name.endswith("_corrupt"):
            active = active & (gate != 0).unsqueeze(-1)
        # (example, position) of every weighted row; advanced indexing gathers just those
        # rows, even from a non-contiguous view such as ``hidden[:, :-1]``.
        ex, pos = active.nonzero().unbind(-1)
        tgt = seq.targets[ex, pos].long()
        w_rows = m[ex, pos]
        if kl is None or kl is m:
            checks.check_targets(name, tgt, ignore_index, v)
        else:  # rows with only a KL weight need no target (their reward weight is 0)
            checks.check_targets(name, tgt[w_rows != 0], ignore_index, v)
            checks.check_targets(name, tgt[w_rows == 0], ignore_index, v, where="kl_mask")
        h_parts.append(seq.policy[ex, pos])
        hr_parts.append(seq.ref.detach()[ex, pos])
        t_parts.append(tgt)
        kw_parts.append(torch.zeros_like(w_rows) if kl is None else kl[ex, pos].to(w_rows.dtype))
        segs.append((name, ex, w_rows))
    return _Rows(
        torch.cat(h_parts), torch.cat(hr_parts), torch.cat(t_parts), torch.cat(kw_parts), segs
    )


def _fused_stats(
    rows: _Rows, weight: Tensor, ref_weight: Tensor | None, lambda_: float, impl: str | None,
    tile_budget_mb: float | None, ignore_index: int,
) -> TokenKLOutput:  # fmt: skip
    """Per-row log-probs of both models and the mixed KL: ONE ``token_kl`` call, so the head
    weight is streamed once per step. With a frozen head (LoRA) that call computes each row's
    gradients w.r.t. its hidden state in the forward (docs/design.md §3.8, plan ``jacobian``):
    the rank and visual terms couple an example's rows only through per-row scalars, which
    the backward applies to those per-row gradients. A trained head recomputes the logits in
    the backward."""
    wr = ref_weight
    if wr is None and weight.requires_grad:
        wr = weight.detach()  # the reference is frozen even when the head is trained
    elif wr is not None:
        wr = wr.detach()
    return _fused_token_kl(
        rows.policy,
        rows.ref,
        weight,
        wr,
        mask=rows.kl_weight,
        targets=rows.targets,
        lambda_=lambda_,
        ignore_index=ignore_index,
        reduction="none",
        impl=impl,
        tile_budget_mb=tile_budget_mb,
    )


@torch.compiler.disable
def _fused_token_kl(*args, **kwargs):
    """``token_kl``, always run eagerly: under ``torch.compile`` the step is compiled around it.

    The op selects rows by data (``nonzero``) and its impls launch their own kernels; Dynamo
    cannot trace the Triton interpreter's Python (TRITON_INTERPRET=1) nor gains anything from
    tracing a call that is one opaque fused kernel per direction, so it is kept out of the graph.
    Autograd still connects the compiled pieces through it.
    """
    return token_kl(*args, **kwargs)


def _per_example_sums(rows: _Rows, out: TokenKLOutput, b: int) -> _Sums:
    """Scatter-add the weighted per-row values back to their examples: R, Σ m log π, Σ m, and
    the KL sums of the chosen sequence (its rows come first)."""
    segs = rows.segs
    sizes = [s[1].numel() for s in segs]
    rho = torch.split(out.policy_logps - out.ref_logps, sizes)
    lp = torch.split(out.policy_logps, sizes)
    acc = out.policy_logps.dtype
    zeros = torch.zeros(b, dtype=acc, device=out.policy_logps.device)
    big_r, logps, count = {}, {}, {}
    for (name, ex, w_rows), r_rows, lp_rows in zip(segs, rho, lp):
        wr_ = w_rows.to(acc)
        big_r[name] = zeros.index_add(0, ex, wr_ * r_rows)
        logps[name] = zeros.index_add(0, ex, (wr_ * lp_rows).detach())
        count[name] = zeros.index_add(0, ex, wr_)
    ex_c, n_c = segs[0][1], sizes[0]
    k_c = rows.kl_weight[:n_c].to(acc)
    mixed_kl = zeros.index_add(0, ex_c, out.loss[:n_c])
    fkl = zeros.index_add(0, ex_c, (k_c * out.forward_kl[:n_c]).detach())
    rkl = zeros.index_add(0, ex_c, (k_c * out.reverse_kl[:n_c]).detach())
    return _Sums(big_r, logps, count, mixed_kl, fkl, rkl)
