"""Input checks of ``FiReMPOLoss``: clear errors that name the argument and what was seen."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_has_data

# Field names of ``loss.SequenceStates``, in order (error messages name them); the last one,
# ``kl_mask``, is optional (a 4-tuple or a None leaves it at ``mask``).
SEQ_FIELDS = ("policy", "ref", "targets", "mask", "kl_mask")


def corrupt_gate(has_corrupt, b: int, device) -> Tensor | None:
    """``has_corrupt`` checked and as a detached float (B,) tensor; None stays None."""
    if has_corrupt is None:
        return None
    if not isinstance(has_corrupt, Tensor):
        raise TypeError(f"has_corrupt must be a tensor of shape ({b},), got {has_corrupt!r}")
    if tuple(has_corrupt.shape) != (b,):
        raise ValueError(
            f"has_corrupt must have shape (B,) = ({b},), got {tuple(has_corrupt.shape)}"
        )
    if has_corrupt.is_complex():
        raise TypeError(f"has_corrupt must be bool or real, got {has_corrupt.dtype}")
    if has_corrupt.device != device:
        raise ValueError(f"has_corrupt is on {has_corrupt.device}, hidden states on {device}")
    hc = has_corrupt.detach()
    hc = hc if hc.dtype.is_floating_point else hc.float()
    # A weight below 0 would flip the visual term into its opposite (reward the model for
    # preferring y+ on the corrupted image). NaN passes: NaN in, NaN out.
    if bool((hc < 0).any()):
        raise ValueError(
            f"has_corrupt must be >= 0 (a 0/1 switch or a weight), got negative values "
            f"{hc[hc < 0][:5].tolist()}"
        )
    return hc


def missing_corrupt(name: str, loss) -> ValueError:
    """The error for a corrupted sequence that a term with a nonzero coefficient needs."""
    parts = [f"gamma={loss.gamma} > 0"] if loss.gamma > 0 else []
    if name == "chosen_corrupt" and loss.alpha_v1 > 0:
        parts.append(f"alpha_v1={loss.alpha_v1} > 0")
    if name == "rejected_corrupt" and loss.alpha_v2 > 0:
        parts.append(f"alpha_v2={loss.alpha_v2} > 0")
    why = " or ".join(parts)
    return ValueError(
        f"{name} is required when {why}; pass it, or set has_corrupt to all "
        f"False for a batch without corrupted images"
    )


def check_targets(name: str, tgt: Tensor, ignore_index: int, v: int, where: str = "mask") -> None:
    """The targets gathered at the weighted positions of one sequence: real ids in [0, V).
    ``where="kl_mask"``: positions with only a KL weight, which may also have no target."""
    ignored = tgt == ignore_index
    if where == "mask" and bool(ignored.any()):
        raise ValueError(
            f"{name}.targets is ignore_index={ignore_index} at positions where "
            f"{name}.mask is nonzero; every weighted position needs a target"
        )
    bad = ((tgt < 0) | (tgt >= v)) & ~ignored
    if bool(bad.any()):
        raise ValueError(
            f"{name}.targets must be in [0, V={v}) where {name}.{where} is nonzero"
            f"{' (or ignore_index)' if where != 'mask' else ''}; found {int(bad.sum())} "
            f"outside, e.g. {tgt[bad][:5].tolist()}"
        )


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def check_seq(name: str, seq, like=None) -> tuple[int, int]:
    """Shapes of one ``SequenceStates`` (any 4- or 5-tuple); returns (B, L). Also checks B, L,
    D, D_ref and dtypes against ``like`` (the chosen sequence)."""
    if not isinstance(seq, tuple) or len(seq) not in (4, 5):
        raise TypeError(
            f"{name} must be SequenceStates(policy, ref, targets, mask[, kl_mask]), got "
            f"{type(seq).__name__}" + (f" of {len(seq)} fields" if isinstance(seq, tuple) else "")
        )
    for field, x in zip(SEQ_FIELDS, seq):
        if field == "kl_mask" and x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {_shape(x)}")
        check_has_data(f"{name}.{field}", x)
    pol, ref, tgt, m = seq[:4]
    if pol.dim() != 3:
        raise ValueError(f"{name}.policy must have shape (B, L, D), got {_shape(pol)}")
    if ref.dim() != 3 or ref.shape[:2] != pol.shape[:2]:
        raise ValueError(
            f"{name}.ref must have shape (B, L, D_ref) = {tuple(pol.shape[:2])} + (D_ref,), "
            f"got {_shape(ref)} (policy {_shape(pol)})"
        )
    for field, x in (("policy", pol), ("ref", ref)):
        if x.shape[-1] < 1:
            raise ValueError(f"{name}.{field} must have hidden size D >= 1, got {_shape(x)}")
    if tuple(tgt.shape) != tuple(pol.shape[:2]):
        raise ValueError(
            f"{name}.targets must have shape (B, L) = {tuple(pol.shape[:2])}, got {_shape(tgt)}"
        )
    if tgt.dtype.is_floating_point or tgt.dtype == torch.bool or tgt.is_complex():
        raise TypeError(f"{name}.targets must be an integer tensor, got {tgt.dtype}")
    if tuple(m.shape) != tuple(pol.shape[:2]):
        raise ValueError(
            f"{name}.mask must have shape (B, L) = {tuple(pol.shape[:2])}, got {_shape(m)}"
        )
    if m.is_complex():
        raise TypeError(f"{name}.mask must be bool or real, got {m.dtype}")
    if len(seq) == 5 and seq[4] is not None:
        _check_kl_mask(name, seq[4], pol)
    for field, x in (("ref", ref), ("targets", tgt), ("mask", m)):
        if x.device != pol.device:
            raise ValueError(
                f"{name}.{field} is on {x.device} but {name}.policy is on {pol.device}"
            )
    bb, ll = pol.shape[0], pol.shape[1]
    if like is None:
        return bb, ll
    b, seq_len = like.policy.shape[:2]
    if bb != b:
        raise ValueError(f"{name} has batch size B={bb} but chosen has B={b}")
    if ll != seq_len:
        raise ValueError(
            f"{name} has length L={ll} but chosen has L={seq_len}; pad all sequences to one length"
        )
    for field, x, y in (("policy", pol, like.policy), ("ref", ref, like.ref)):
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(
                f"{name}.{field} has hidden size {x.shape[-1]} but chosen.{field} has {y.shape[-1]}"
            )
        if x.dtype != y.dtype:
            raise TypeError(f"{name}.{field} dtype {x.dtype} differs from chosen.{field} {y.dtype}")
        if x.device != y.device:
            raise ValueError(f"{name}.{field} is on {x.device} but chosen.{field} on {y.device}")
    return bb, ll


def _check_kl_mask(name: str, k: Tensor, pol: Tensor) -> None:
    """KL weights: (B, L), bool or real, on the policy's device, finite and >= 0 (a negative
    weight would reward drifting from the reference; NaN or inf would poison every step)."""
    if tuple(k.shape) != tuple(pol.shape[:2]):
        raise ValueError(
            f"{name}.kl_mask must have shape (B, L) = {tuple(pol.shape[:2])}, got {_shape(k)}"
        )
    if k.is_complex():
        raise TypeError(f"{name}.kl_mask must be bool or real, got {k.dtype}")
    if k.device != pol.device:
        raise ValueError(f"{name}.kl_mask is on {k.device} but {name}.policy is on {pol.device}")
    if k.device.type == "meta":
        return
    kf = k.detach() if k.dtype.is_floating_point else k.detach().float()
    if not bool(torch.isfinite(kf).all()):
        raise ValueError(f"{name}.kl_mask must be finite; found {int((~torch.isfinite(kf)).sum())} "
                         "NaN or inf values")  # fmt: skip
    if bool((kf < 0).any()):
        raise ValueError(
            f"{name}.kl_mask must be >= 0 (token weights of the KL); found negative values "
            f"{kf[kf < 0][:5].tolist()}"
        )


def check_batch(b: int, reduction: str) -> None:
    """The mean over an empty batch is undefined (it would be NaN); the sum is 0."""
    if b == 0 and reduction == "mean":
        raise ValueError(
            "chosen has batch size B=0: reduction='mean' of an empty batch is undefined "
            "(use reduction='sum', which gives 0, or skip the empty batch)"
        )


def check_weights(weight, ref_weight, chosen) -> None:
    """The head weight(s) against the chosen sequence's D and D_ref (and each other's V)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a (V, D) tensor, got {_shape(weight)}")
    for name, w in (("weight", weight), ("ref_weight", ref_weight)):
        if isinstance(w, Tensor):
            check_has_data(name, w)
    d, d_ref = chosen.policy.shape[-1], chosen.ref.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"weight has D={weight.shape[1]} but chosen.policy has D={d}")
    if ref_weight is None:
        if d_ref != d:
            raise ValueError(
                f"chosen.ref has D_ref={d_ref} != D={d}: pass ref_weight of shape "
                f"(V, {d_ref}) for a separate reference head"
            )
    else:
        if not isinstance(ref_weight, Tensor) or ref_weight.dim() != 2:
            raise ValueError(f"ref_weight must be a (V, D_ref) tensor, got {_shape(ref_weight)}")
        if ref_weight.shape[1] != d_ref:
            raise ValueError(
                f"ref_weight has D_ref={ref_weight.shape[1]} but chosen.ref has {d_ref}"
            )
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"ref_weight has V={ref_weight.shape[0]} but weight has V={weight.shape[0]}"
            )
