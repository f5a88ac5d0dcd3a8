"""The first-use GPU self-test the compiled impls share ("cuda": csrc kernels; "triton": what
triton compiled for this GPU): their kernels against impl "torch" on a few small odd cases,
before auto-selection trusts them with a training run. CPU tests cannot execute GPU code
(emulators and interpreters run the source as written), so this is the one check of the code
a GPU actually runs; a failure makes the impl unavailable, with the case and statistic named.

A case is ``(mode, n, d, dr, v, splits, dtype, lora)``: mode "shared" (the reference uses the
policy's head), "separate" or "logprob"; ``lora`` False: every gradient, True: hidden-state
gradients only (h and hr, no head), "frozen-ref": the policy's hidden states only (LoRA
training against a frozen reference: the common backward); the impl's forward runs with
``splits`` vocabulary splits (0 = its own choice), inputs are rounded to ``dtype`` and impl
"torch" sees the same rounded values in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._backend import Grads, Needs, RowGrads, RowStats

FWD_TOL, BWD_TOL = 2e-2, 3e-2  # relative (norm) errors: bf16 / fp16 inputs, fp32 statistics


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the absolute norm where b is zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def compare(what: str, names, got, ref, tol: float) -> str | None:
    """The first of ``names`` whose tensor in ``got`` is missing, not finite or off ``ref`` by
    more than ``tol`` (``None`` where both are ``None``): "{what} {name}: rel err ..."."""
    for name, a, b in zip(names, got, ref):
        if a is None and b is None:
            continue
        if a is None or b is None or not torch.isfinite(a).all() or rel_err(a, b) > tol:
            err = None if a is None or b is None else rel_err(a, b)
            return f"{what} {name}: rel err {err}"
    return None


class Case:
    """One case's inputs on ``device``: ``args`` (h, hr, w, wr) in the case's dtype, ``args32``
    the same values in fp32, per-row incoming gradients ``grads``, the gradients ``need``ed,
    and ``what`` (a label for failures)."""

    def __init__(self, case: tuple, gen: torch.Generator, device: torch.device):
        mode, n, d, dr, v, self.splits, dtype, lora = case
        kl = mode != "logprob"

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32)

        h = rnd(n, d)
        hr = (h + 0.3 * rnd(n, d) if mode == "shared" else rnd(n, dr)) if kl else None
        w = rnd(v, d) * (2.0 / math.sqrt(d))
        wr = rnd(v, dr) * (2.0 / math.sqrt(dr)) if mode == "separate" else None
        g = [rnd(n) if (kl or k == 2) else None for k in range(4)]

        def to(x, dt):
            return None if x is None else x.to(device, dt)

        self.args = [to(x, dtype) for x in (h, hr, w, wr)]
        self.args32 = [to(x, torch.float32) for x in self.args]  # the same rounded values
        self.grads = RowGrads(*(to(x, torch.float32) for x in g))
        if lora == "frozen-ref":
            self.need = Needs(True, False, False, False)
        else:
            self.need = Needs(True, kl, not lora, mode == "separate" and not lora)
        tag = {False: "", True: " LoRA", "frozen-ref": " LoRA frozen-ref"}[lora]
        self.what = f"{mode} {str(dtype)[6:]}{tag} (n={n}, d={d}, v={v})"


Forward = Callable[..., RowStats]  # (h, hr, w, wr, temperature, splits=) -> RowStats
Backward = Callable[..., Grads]  # (h, hr, w, wr, temperature, stats, grads, need) -> Grads
Extra = Callable[[Case, RowStats, Grads], str | None]  # more checks against the references


def run(cases, forward: Forward, backward: Backward, device: torch.device,
        extra: Extra | None = None, temperature: float = 0.9) -> str | None:  # fmt: skip
    """Every case through ``forward`` and ``backward`` (and ``extra``) against impl "torch";
    the first failure (an exception included, named by type), or None."""
    from . import torch_impl

    gen = torch.Generator(device="cpu").manual_seed(1234)
    try:
        for spec in cases:
            c = Case(spec, gen, device)
            got = forward(*c.args, temperature, splits=c.splits)
            ref = torch_impl.forward(*c.args32, temperature)
            fail = compare(f"{c.what} forward", ("lse", "lser", "fkl", "rkl"), got, ref, FWD_TOL)
            if fail:
                return fail
            got_b = backward(*c.args, temperature, ref, c.grads, c.need)
            ref_b = torch_impl.backward(*c.args32, temperature, ref, c.grads, c.need)
            fail = compare(f"{c.what} backward", ("dh", "dhr", "dw", "dwr"), got_b, ref_b,
                           BWD_TOL)  # fmt: skip
            if fail:
                return fail
            if extra is not None and (fail := extra(c, ref, ref_b)):
                return fail
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
