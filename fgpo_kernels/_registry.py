"""One small registry of fused implementations.

Auto-selection (``impl=None``) walks the preference order and quietly takes the first impl that
is available for the given tensors; an explicitly requested impl that is unavailable raises a
``RuntimeError`` saying why. ``FGPO_IMPL`` in the environment overrides ``impl=None``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from ._backend import Backend
from ._util import simulated_gpu, triton_interpret

IMPLS = ("reference", "torch", "triton", "cuda")
# Preference order for impl=None on each device type. On CUDA: "triton" (its forward is
# PREDICTED as fast as "cuda"'s sm_90a wgmma forward, the default of an sm_90a build on an
# H100/H200: the same m64n128 tiles, which python -m benchmarks.gpu_model cannot tell apart,
# and faster than "cuda"'s mma.sync forward everywhere else; its backward is gblock, the safe
# default until a GPU run has timed every backward path), then "cuda" (whose backward is
# triton's gblock too unless FGPO_CUDA_BWD=cuda), then "torch".
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}


@dataclass
class _Entry:
    module: str  # path of a module that satisfies _backend.Backend (probe, forward, backward)


_ENTRIES = {
    "torch": _Entry("fgpo_kernels.torch_impl"),
    "triton": _Entry("fgpo_kernels.triton_kl"),
    "cuda": _Entry("fgpo_kernels.cuda_kl"),
}


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module(_ENTRIES[name].module)
    except Exception as exc:
        return None, f"import failed: {type(exc).__name__}: {exc}"
    return mod, ""


def status(name: str) -> dict:
    """{"available": bool, "built": bool, "reason": str} for one impl."""
    if name == "reference":
        return {"available": True, "built": True, "reason": "materialized logits (tests only)"}
    if name not in _ENTRIES:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {name!r}")
    mod, why = _load(name)
    if mod is None:
        return {"available": False, "built": False, "reason": why}
    return mod.probe()


def backend_status() -> dict[str, dict]:
    """Availability of every impl: ``{impl: {"available", "built", "reason"}}``."""
    return {name: status(name) for name in IMPLS}


def _usable_on(name: str, device: torch.device) -> tuple[bool, str]:
    if simulated_gpu() is not None and device.type == "meta" and name in ("triton", "cuda"):
        from . import _fake  # meta tensors stand for the simulated GPU

        return _fake.usable(name)
    st = status(name)
    if not st["available"]:
        return False, st["reason"]
    if name == "triton" and device.type != "cuda" and not triton_interpret():
        return False, "impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "cuda" and device.type != "cuda":
        return False, f"impl 'cuda' needs CUDA tensors, got tensors on {device}"
    return True, ""


def check_name(impl) -> None:
    """``impl`` is one of ``IMPLS`` or None, else ``ValueError`` naming the argument (checked
    where it is given, e.g. at ``FiReMPOLoss`` construction, not at the first forward)."""
    if impl is not None and (not isinstance(impl, str) or impl not in IMPLS):
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")


def resolve(impl: str | None, device: torch.device) -> str:
    """Pick the impl name for tensors on ``device``."""
    if impl is None:
        impl = os.environ.get("FGPO_IMPL") or None
        if impl is not None and impl not in IMPLS:
            raise ValueError(
                f"the environment variable FGPO_IMPL={impl!r} is not an impl: set it to one of "
                f"{IMPLS}, or unset it for the best available"
            )
    if impl is None:
        kind = "cuda" if simulated_gpu() is not None and device.type == "meta" else device.type
        for name in _AUTO_ORDER.get(kind, ("triton", "torch")):
            if _usable_on(name, device)[0]:
                return name
        return "torch"
    check_name(impl)
    if impl == "reference":
        return impl
    ok, why = _usable_on(impl, device)
    if not ok:
        raise RuntimeError(f"impl {impl!r} is unavailable: {why}")
    return impl


def resolve_impl(impl: str | None = None, device: str | torch.device = "cpu") -> str:
    """The impl a call with ``impl=`` on tensors on ``device`` runs: what auto-selection (and
    ``FGPO_IMPL``) picks for ``impl=None``, else ``impl`` itself once checked usable there
    (an unusable explicit impl raises with the reason, as the ops do)."""
    return resolve(impl, torch.device(device))


def module(name: str) -> Backend:
    """The backend module of impl ``name`` (``RuntimeError`` with the reason if unavailable);
    while a GPU is simulated on meta tensors, the fake host code of "triton" and "cuda"."""
    if simulated_gpu() is not None and name in ("triton", "cuda"):
        from . import _fake

        return _fake.backend(name)
    mod, why = _load(name)
    if mod is None:
        raise RuntimeError(f"impl {name!r} is unavailable: {why}")
    return mod
