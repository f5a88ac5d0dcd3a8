"""Small helpers that several modules of ``fgpo_kernels`` share (one home for each)."""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype for statistics of ``x``: float32, except that float64 input stays
    float64 (the exact checks against the reference run in float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_real(name: str, value) -> None:
    """A finite Python int or float (not a bool), else ``TypeError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")


def check_fraction(name: str, value) -> None:
    """A finite real number in [0, 1] (a mixing weight), else an error naming the argument."""
    check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_index(name: str, value) -> None:
    """A Python int (not a bool, not a float such as -100.0), else ``TypeError`` naming it:
    an index is compared with integer targets, where a float or None would silently match
    nothing."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


# The GPU that meta tensors stand for while a memory simulation runs (see _fake.py), or None.
_SIMULATED_GPU: dict | None = None


def simulated_gpu() -> dict | None:
    """``{"name", "sm_count"}`` of the GPU being simulated on meta tensors, or None."""
    return _SIMULATED_GPU


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): sizes the vocabulary splits.
    While a GPU is simulated (``_fake.simulate_gpu``), that GPU's count."""
    if _SIMULATED_GPU is not None:
        return int(_SIMULATED_GPU["sm_count"])
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def no_cuda_reason() -> str:
    """Why torch sees no GPU, in the user's terms: a CPU-only build of torch, or a CUDA build
    that finds no device (driver, ``CUDA_VISIBLE_DEVICES``)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: it has no CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
