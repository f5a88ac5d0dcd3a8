"""Adapters: every implementation the runner compares, behind one small interface.

``skip_reason(impl, case, device, interpreter_ok)`` says (cheaply, in the parent process) why an
impl cannot run a case, or returns None; ``build(impl, case, device)`` (in the worker process)
makes the inputs and returns ``(fn, leaves, note)``: ``fn()`` runs the forward and returns the
scalar to backpropagate, ``leaves`` are the tensors whose ``.grad`` it fills.

What each impl computes, per op (all from hidden states and the head weight ``w``; the policy
hidden states and ``w`` receive gradients unless ``--frozen-weight``; the reference side is
frozen):

token_kl (mixed KL, λ = 0.5: both directions in one call)
    torch / triton / cuda   ``fgpo_kernels.token_kl(h, hr, w, w.detach(), impl=...)``
    torch_recompute         ours, impl torch, with ``FGPO_GRADS_IN_FORWARD=off``: the backward
                            recomputes the logits (the path before gradients moved into the
                            forward; docs/design.md §3.8); ``triton_recompute`` likewise
    matmul_floor            only the matmuls the op must do (2 logits + dH + dW), computed in
                            the forward (``benchmarks/floor.py``): the floor on this machine
    materialized            the same with ``impl="reference"`` (full N x V logits, autograd)
    liger_jsd_b0 / _b1      Liger-Kernel's fused linear JSD at β=0 (forward KL) / β=1 (reverse
                            KL): ONE direction per call. CPU: its chunked torch loss
                            ``LigerFusedLinearJSDLoss`` (torch.compile'd chunks, as shipped;
                            ``--liger-compile off`` turns compile off); GPU: its Triton
                            ``LigerFusedLinearJSD``.
token_logprobs (log π(y) per row)
    torch / triton / cuda   ``fgpo_kernels.token_logprobs(h, w, y, impl=...)``
    materialized            ``impl="reference"``
    liger_flce              Liger's fused linear cross entropy, ``reduction="none"`` (GPU)
    cce                     Cut Cross-Entropy ``linear_cross_entropy``, ``reduction="none"``
                            (GPU; its default gradient filtering)
    torch_lce               ``torch.nn.functional.linear_cross_entropy`` with
                            ``LinearCrossEntropyOptions()`` (PyTorch's own chunked path), when
                            torch has it; on CPU with ``batch_chunk_size=2**21 // V`` (our
                            chunk budget: its fp32 default picks 2-row chunks there)
fire_mpo_step: see ``benchmarks/e2e.py`` (impls torch / triton / cuda / materialized;
    torch_recompute as above).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from contextlib import contextmanager

OURS = ("torch", "triton", "cuda")
# Ours under a switch: impl -> (impl it runs, environment it sets in its worker process).
VARIANTS = {
    "torch_recompute": ("torch", {"FGPO_GRADS_IN_FORWARD": "off"}),
    "triton_recompute": ("triton", {"FGPO_GRADS_IN_FORWARD": "off"}),
}
IMPLS = {
    "token_kl": (*OURS, *VARIANTS, "matmul_floor", "materialized", "liger_jsd_b0",
                 "liger_jsd_b1"),
    "token_logprobs": (*OURS, "materialized", "liger_flce", "cce", "torch_lce"),
    "fire_mpo_step": (*OURS, *VARIANTS, "materialized"),
}  # fmt: skip
ALL_IMPLS = tuple(dict.fromkeys(i for v in IMPLS.values() for i in v))
PEERS = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


# impl "cuda"'s two forward kernels (env FGPO_CUDA_FWD; ``cuda_kl.forward_path`` says which one
# runs): "wgmma" (sm_90a, csrc/fwd_wgmma.cuh) and "mma" (mma.sync, csrc/kernels.cuh).
CUDA_FWD_PATHS = ("wgmma", "mma")


@contextmanager
def env_switch(env: dict):
    """``env`` set around a block (a variant's switch, a forced kernel path), the previous
    values back afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cuda_fwd_paths() -> tuple[str | None, dict[str, str | None]]:
    """(the path impl "cuda"'s forward takes by default here, {path: None where
    ``FGPO_CUDA_FWD=path`` runs it, else why not}). "wgmma" needs a ``fgpo_kernels._C`` built
    with an sm_90a target (``_C.WGMMA``), a compute capability 9.0 device, and
    ``cuda_kl.forward_path`` to say so under ``FGPO_CUDA_FWD=wgmma``; a ``cuda_kl`` without
    ``forward_path`` has only the mma.sync forward. Asks nothing of a GPU it has not got."""
    import torch

    from fgpo_kernels import _registry

    st = _registry.status("cuda")
    if not st["available"]:
        return None, dict.fromkeys(CUDA_FWD_PATHS, f"impl 'cuda' unavailable: {st['reason']}")
    from fgpo_kernels import cuda_kl

    which = getattr(cuda_kl, "forward_path", None)
    if which is None:
        return "mma", {"wgmma": "this fgpo_kernels has no wgmma forward (no "
                       "cuda_kl.forward_path)", "mma": None}  # fmt: skip
    dev = torch.device("cuda")  # the current device, as the ops run on it
    cap = torch.cuda.get_device_capability(dev)
    why_not = {"mma": None, "wgmma": None}
    if not getattr(cuda_kl._ext(), "WGMMA", False):
        why_not["wgmma"] = "fgpo_kernels._C was built without an sm_90a target (_C.WGMMA)"
    elif cap != (9, 0):
        why_not["wgmma"] = f"the device is sm_{cap[0]}{cap[1]}: the wgmma forward needs sm_90"
    out = {}
    for path in CUDA_FWD_PATHS:
        with env_switch({"FGPO_CUDA_FWD": path}):
            try:
                got = which(dev)
                why = None if got == path else f"gives {got!r} for FGPO_CUDA_FWD={path}"
            except Exception as exc:  # the forced path cannot run: say why
                why = f"refuses FGPO_CUDA_FWD={path}: {type(exc).__name__}: {exc}"
        out[path] = why_not[path] or (why and f"cuda_kl.forward_path {why}")
    with env_switch({"FGPO_CUDA_FWD": "auto"}):
        try:
            auto = which(dev)
        except Exception:  # the default cannot be told: the rows say "unknown", never guess
            auto = None
    return (auto if auto in CUDA_FWD_PATHS else None), out


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def peer_version(impl: str) -> str:
    """Version of the package behind an impl ("" for ours)."""
    from importlib.metadata import PackageNotFoundError, version

    dist = {"liger": "liger-kernel", "cce": "cut-cross-entropy", "torch": "torch"}
    key = "liger" if impl.startswith("liger") else "torch" if impl == "torch_lce" else impl
    if key not in dist or impl == "torch":
        return ""
    try:
        return version(dist[key])
    except PackageNotFoundError:
        return ""


def skip_reason(impl: str, case, device: str, interpreter_ok: bool) -> str | None:
    """None if ``impl`` can run ``case`` on ``device``, else why not (one line)."""
    if impl not in IMPLS.get(case.op, ()):
        return f"{impl} does not implement {case.op}"
    gpu = device == "cuda"
    impl = VARIANTS.get(impl, (impl,))[0]
    if impl == "matmul_floor":
        return None
    if impl in OURS:
        if impl == "triton" and not gpu:
            if not (interpreter_ok and case.note == "interpreter"):
                return (
                    "triton on CPU runs only in the interpreter (TRITON_INTERPRET=1); "
                    "timed at the tiny interpreter shape only"
                )
            if not _has("triton"):
                return "triton is not installed"
            return _ours_status(impl, interpret=True)
        if impl == "cuda" and not gpu:
            return "impl 'cuda' needs a CUDA device"
        if case.op == "fire_mpo_step" and not _has_loss():
            return "fgpo_kernels.FiReMPOLoss is not available in this install"
        return _ours_status(impl, interpret=False)
    if impl == "materialized":
        return None
    if impl.startswith("liger"):
        if not _has("liger_kernel"):
            return "liger-kernel is not installed (pip install -e '.[bench]')"
        if impl == "liger_flce" and not gpu:
            return (
                "Liger's fused linear cross entropy is a Triton kernel (CUDA only); Liger has "
                "no chunked CPU cross entropy"
            )
        return None
    if impl == "cce":
        if not gpu:
            return "Cut Cross-Entropy's kernels are Triton (CUDA only)"
        if not _has("cut_cross_entropy"):
            return "cut-cross-entropy is not installed (pip install -e '.[bench]')"
        return None
    if impl == "torch_lce":
        import torch

        if not hasattr(torch.nn.functional, "linear_cross_entropy") or not hasattr(
            torch.nn, "LinearCrossEntropyOptions"
        ):
            return f"torch {torch.__version__} has no chunked linear_cross_entropy"
        return None
    return f"unknown impl {impl!r}"


def _has_loss() -> bool:
    try:
        import fgpo_kernels as fk

        return hasattr(fk, "FiReMPOLoss")
    except Exception:
        return False


def _ours_status(impl: str, interpret: bool) -> str | None:
    if interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fgpo_kernels as fk

    st = fk.backend_status()[impl]
    return None if st["available"] else st["reason"]


# ----------------------------------------------------------------------------- worker side


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build(impl: str, case, device: str, grad_w: bool = True, liger_eager: bool = False, seed=0):
    """Inputs for ``case`` and a closure running ``impl`` on them: ``(fn, leaves, note)``."""
    import torch

    if impl in VARIANTS:  # each (case, impl) runs in a process of its own
        impl, env = VARIANTS[impl]
        os.environ.update(env)
    dt = _dtype(case.dtype)
    if case.op == "fire_mpo_step":
        from . import e2e

        b, seq_len, resp, span = case.seq
        # The head is frozen here (LoRA, as FiRe-MPO trains): gradients go to the hidden states.
        w, seqs, hc = e2e.make_inputs(b, seq_len, resp, span, case.d, case.v, dt, device,
                                      grad_w=False, seed=seed)  # fmt: skip
        if impl == "materialized":
            fn = lambda: e2e.materialized_step(w, seqs, hc)
            note = "full logits for every position of the 8 passes"
        else:
            fn = lambda: e2e.ours_step(w, seqs, hc, impl)
            note = "FiReMPOLoss: span rows only, one fused pass"
        return fn, e2e.leaves(w, seqs), note

    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d, v = case.n, case.d, case.v
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dt).requires_grad_(True)
    hr = torch.randn(n, d, generator=g).to(device=device, dtype=dt)
    w = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(device=device, dtype=dt)
    w.requires_grad_(grad_w)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    leaves = [h, w] if grad_w else [h]
    # The reference head has the policy's values but takes no gradient: a distinct tensor, so
    # our kernels take it as a separate weight (W read for each side; gpu_model.compare predicts
    # that case). wr=None (the shared head) would also send the reference side's gradient to W.
    wr = w.detach()
    note = ""

    if case.op == "token_kl":
        if impl in OURS or impl == "materialized":
            import fgpo_kernels as fk

            name = "reference" if impl == "materialized" else impl
            fn = lambda: fk.token_kl(h, hr, w, wr, lambda_=0.5, impl=name).loss
            note = "both KL directions" + (" (interpreter)" if case.note and impl == "triton"
                                           else "")  # fmt: skip
            if impl in ("torch", "triton"):
                note += "; gradients " + (
                    "recomputed in the backward"
                    if os.environ.get("FGPO_GRADS_IN_FORWARD") == "off"
                    else "computed in the forward"
                )
        elif impl == "matmul_floor":
            from .floor import token_kl_floor

            fn = lambda: token_kl_floor(h, hr, w)
            note = "matmuls only: 2 logits + dH" + (" + dW" if grad_w else "")
        elif impl.startswith("liger_jsd"):
            beta = 0.0 if impl.endswith("b0") else 1.0
            if device == "cuda":
                from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

                mod = LigerFusedLinearJSD(jsd_beta=beta)
                fn = lambda: mod(h, w, hr, wr, None)
                note = "Triton fused linear JSD; one KL direction"
            else:
                from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

                mod = LigerFusedLinearJSDLoss(
                    weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                    compiled=not liger_eager,
                )  # fmt: skip
                fn = lambda: mod(h, w, hr, wr, y)
                note = ("chunked, eager" if liger_eager else "chunked, torch.compile") + (
                    "; one KL direction"
                )
        else:
            raise ValueError(f"{impl} does not implement token_kl")
        return fn, leaves, note

    if case.op == "token_logprobs":
        if impl in OURS or impl == "materialized":
            import fgpo_kernels as fk

            name = "reference" if impl == "materialized" else impl
            fn = lambda: fk.token_logprobs(h, w, y, impl=name).sum()
            note = "(interpreter)" if case.note and impl == "triton" else ""
        elif impl == "liger_flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            mod = LigerFusedLinearCrossEntropyLoss(reduction="none")
            fn = lambda: -mod(w, h, y).sum()
        elif impl == "cce":
            from cut_cross_entropy import linear_cross_entropy

            fn = lambda: -linear_cross_entropy(h, w, y, reduction="none").sum()
            note = "default filter_eps"
        elif impl == "torch_lce":
            import torch.nn.functional as F

            if device == "cuda":  # its defaults were tuned on CUDA
                opts = torch.nn.LinearCrossEntropyOptions()
                note = "LinearCrossEntropyOptions() defaults"
            else:
                # Our torch impl's chunk budget (2**21 logits per chunk): the default fp32
                # heuristic ("aspect_ratio:2") picks next_pow2(N / ceil(V / D)) / 2 rows, i.e.
                # 2-row chunks at N=512, V=32768, D=256, 15x slower on CPU.
                rows = max(1, min(n, (1 << 21) // v))
                opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)
                note = f"batch_chunk_size={rows} (2**21 // V, as ours)"
            fn = lambda: -F.linear_cross_entropy(h, w, y, reduction="none", options=opts).sum()
        else:
            raise ValueError(f"{impl} does not implement token_logprobs")
        return fn, leaves, note
    raise ValueError(f"unknown op {case.op!r}")


def matmul_flops(case, mode: str, grad_w: bool) -> float:
    """USEFUL matmul FLOPs: what the op must do, recomputation not counted (design §4.4):
    forward = the logit matmuls (2 for token_kl, 1 for token_logprobs); backward = dH and, when
    the head is trained, dW. 0 for fire_mpo_step (its row count depends on the masks)."""
    if case.op == "fire_mpo_step":
        return 0.0
    one = 2.0 * case.n * case.d * case.v
    fwd = one * (2 if case.op == "token_kl" else 1)
    bwd = one * (2 if grad_w else 1)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# How the peers compute their gradients, for executed FLOPs (our ops report their own plan):
# Liger's fused linear CE / JSD compute the gradient in the forward, chunk by chunk ("held");
# Cut Cross-Entropy recomputes the logits in its backward; the materialized path keeps its
# logits for autograd; matmul_floor does its matmuls in the forward. Unknown: "" (not scored).
PEER_PLANS = {
    "liger_flce": "held", "liger_jsd_b0": "held", "liger_jsd_b1": "held", "cce": "recompute",
    "materialized": "materialized", "matmul_floor": "held",
}  # fmt: skip


class PlanLog(logging.Handler):
    """Collects the plans (recompute / held / jacobian) our ops log at DEBUG level while
    active; ``plan()`` is the one plan seen, "mixed" for several, "" for none (peers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"\bplan (\w+)", record.getMessage())
        if m:
            self.seen.add(m.group(1))

    def plan(self) -> str:
        return next(iter(self.seen)) if len(self.seen) == 1 else ("mixed" if self.seen else "")

    def __enter__(self):
        self.log = logging.getLogger("fgpo_kernels")
        self.old = self.log.level
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.log.removeHandler(self)
        self.log.setLevel(self.old)


def peer_plan(impl: str) -> str:
    """The gradient plan of a peer impl (``PEER_PLANS``), "" when unknown."""
    return PEER_PLANS.get(impl, "")


def split_by_plan(plan: str, fwd: float, bwd: float, jacobian: float) -> dict[str, float]:
    """EXECUTED matmul FLOPs per mode from the useful ones (``fwd`` = the logit matmuls, ``bwd``
    = dH (+ dW)) for the gradient ``plan`` an op took: "recompute" (the backward recomputes the
    logits), "held" (gradients computed in the forward: the forward does all useful work, the
    backward scales), "jacobian" (frozen head: the forward also does ``jacobian``, the per-row
    d out/dh products), "materialized" (autograd through kept logits: the useful FLOPs as they
    fall). Empty for an unknown or mixed plan (not scored)."""
    if plan == "recompute":
        f, b = fwd, bwd + fwd
    elif plan == "held":
        f, b = fwd + bwd, 0.0
    elif plan == "jacobian":
        f, b = fwd + jacobian, 0.0
    elif plan == "materialized":
        f, b = fwd, bwd
    else:
        return {}
    return {"forward": f, "backward": b, "full": f + b}


def executed_flops(case, mode: str, grad_w: bool, plan: str) -> float:
    """``split_by_plan`` for a benchmark case (0 for fire_mpo_step or an unknown plan). The
    jacobian plan does one dH-sized product per output: lp, and fkl and rkl for token_kl."""
    if case.op == "fire_mpo_step":
        return 0.0
    one = 2.0 * case.n * case.d * case.v
    fwd, bwd = matmul_flops(case, "forward", grad_w), matmul_flops(case, "backward", grad_w)
    jac = one * (3 if case.op == "token_kl" else 1)
    return split_by_plan(plan, fwd, bwd, jac).get(mode, 0.0)
