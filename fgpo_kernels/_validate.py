"""Input checks shared by the public ops: clear errors that name the argument and what was seen."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import check_index, simulated_gpu

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _desc(x: Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def _check_float(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {_desc(x)}")
    check_has_data(name, x)


def check_has_data(name: str, x: Tensor) -> None:
    """Meta tensors have shapes but no values: every statistic of them would be a placeholder.
    Except in a memory simulation (``_fake.simulate_gpu``), where they stand for the GPU's."""
    if x.device.type == "meta" and simulated_gpu() is None:
        raise ValueError(f"{name} is on the meta device (no data to compute with): {_desc(x)}")


def check_width(name: str, x: Tensor) -> None:
    """The hidden size D (last dimension) must be >= 1: with D = 0 every logit is 0."""
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have hidden size D >= 1, got {_desc(x)}")


def check_token_inputs(h, hr, w, wr, mask, targets, ignore_index):
    """Validate and flatten. Returns (lead_shape, h, hr, w, wr, tgt, mask) where h/hr are
    contiguous (N, D) rows, wr is None when the reference shares ``w``, tgt is int64 (N,) with
    -1 for "no target" (or None), and mask is (N,) (or None)."""
    check_index("ignore_index", ignore_index)
    _check_float("policy_hidden" if hr is not None else "hidden", h)
    hname = "policy_hidden" if hr is not None else "hidden"
    if h.dim() < 1:
        raise ValueError(f"{hname} must have shape (..., D), got {_desc(h)}")
    check_width(hname, h)
    _check_float("weight", w)
    if w.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {_desc(w)}")
    if w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"weight has D={w.shape[1]} but {hname} has D={h.shape[-1]} "
            f"({hname}: {_desc(h)}; weight: {_desc(w)})"
        )
    if w.dtype != h.dtype:
        raise TypeError(f"weight dtype {w.dtype} differs from {hname} dtype {h.dtype}")
    if w.device != h.device:
        raise ValueError(f"weight is on {w.device} but {hname} is on {h.device}")
    if w.shape[0] == 0:
        raise ValueError(f"weight must have V >= 1 rows, got {_desc(w)}")
    lead = tuple(h.shape[:-1])
    v = w.shape[0]
    if hr is not None:
        _check_float("ref_hidden", hr)
        check_width("ref_hidden", hr)
        if tuple(hr.shape[:-1]) != lead or hr.dim() != h.dim():
            raise ValueError(
                f"ref_hidden leading shape {tuple(hr.shape[:-1])} must equal policy_hidden's "
                f"{lead} (policy_hidden: {_desc(h)}; ref_hidden: {_desc(hr)})"
            )
        if hr.device != h.device:
            raise ValueError(f"ref_hidden is on {hr.device} but policy_hidden is on {h.device}")
        if wr is w:
            wr = None
        if wr is None:
            if hr.shape[-1] != w.shape[1]:
                raise ValueError(
                    f"ref_hidden has D_ref={hr.shape[-1]} but the shared weight has "
                    f"D={w.shape[1]}; pass ref_weight of shape (V, {hr.shape[-1]})"
                )
            if hr.dtype != w.dtype:
                raise TypeError(f"ref_hidden dtype {hr.dtype} differs from weight dtype {w.dtype}")
        else:
            _check_float("ref_weight", wr)
            if wr.dim() != 2:
                raise ValueError(f"ref_weight must have shape (V, D_ref), got {_desc(wr)}")
            if wr.shape[0] != v:
                raise ValueError(
                    f"ref_weight has V={wr.shape[0]} but weight has V={v} "
                    f"(weight: {_desc(w)}; ref_weight: {_desc(wr)})"
                )
            if wr.shape[1] != hr.shape[-1]:
                raise ValueError(
                    f"ref_weight has D_ref={wr.shape[1]} but ref_hidden has "
                    f"D_ref={hr.shape[-1]} (ref_weight: {_desc(wr)}; ref_hidden: {_desc(hr)})"
                )
            if wr.dtype != hr.dtype:
                raise TypeError(f"ref_weight dtype {wr.dtype} differs from ref_hidden {hr.dtype}")
            if wr.device != h.device:
                raise ValueError(f"ref_weight is on {wr.device} but policy_hidden on {h.device}")
            wr = wr.contiguous()
        hr = hr.reshape(-1, hr.shape[-1]).contiguous()
    n = 1
    for s in lead:
        n *= s
    tgt = None
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"targets must be an integer tensor, got {_desc(targets)}")
        if tuple(targets.shape) != lead:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal the hidden states' leading "
                f"shape {lead} ({hname}: {_desc(h)})"
            )
        if targets.device != h.device:
            raise ValueError(f"targets is on {targets.device} but {hname} is on {h.device}")
        t = targets.reshape(-1).long()
        ignored = t == ignore_index
        bad = ~ignored & ((t < 0) | (t >= v))
        if bool(bad.any()):
            first = t[bad][:5].tolist()
            raise ValueError(
                f"targets must be in [0, V={v}) or ignore_index={ignore_index}; "
                f"found {int(bad.sum())} out of range, e.g. {first}"
            )
        tgt = torch.where(ignored, torch.full_like(t, -1), t)
    m = None
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != lead:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape "
                f"{lead} ({hname}: {_desc(h)})"
            )
        if mask.is_complex():
            raise TypeError(f"mask must be real or bool, got {_desc(mask)}")
        if mask.device != h.device:
            raise ValueError(f"mask is on {mask.device} but {hname} is on {h.device}")
        m = mask.reshape(-1)
        if not m.dtype.is_floating_point:
            m = m.float()
    h = h.reshape(n, h.shape[-1]).contiguous()
    return lead, h, hr, w.contiguous(), wr, tgt, m
