"""What the loss types and RRPO's whole-response KL cost: ``FiReMPOLoss`` forward + backward at
one shape, every variant side by side in one process, in interleaved rounds.

Variants: ``fire_mpo`` with each ``loss_type`` (the pairwise loss is plain torch on (B,)
sums, so they should cost the same), and ``rrpo`` with its KL on the span (no ``kl_mask``)
against RRPO's KL on every response token of y+ (``kl_mask``: more chosen rows projected).
Inputs are ``benchmarks.e2e.make_inputs`` (random hidden states at a real head's D and V, span
masks inside the response); the head is frozen, as with LoRA.

    python -m benchmarks.loss_variants                      # Qwen2.5-VL-7B head / 8, B=4
    python -m benchmarks.loss_variants --d 64 --v 1000 --seq-len 32 --resp 16 --span 4 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fgpo_kernels as fk

from .e2e import SEQ_NAMES, make_inputs
from .run import _device_name


def variants() -> list[tuple[str, dict, bool]]:
    """(name, FiReMPOLoss keyword arguments, whether y+'s response mask is its kl_mask)."""
    smoothed = ("robust", "label_smoothing", "exo_pair")  # ε 0.1; exo_pair needs one
    out = [
        (f"fire_mpo/{t}", dict(loss_type=t, label_smoothing=0.1 if t in smoothed else 0.0), False)
        for t in fk.LOSS_TYPES
    ]
    out.append(("rrpo/span_kl", dict(fk.LOSS_PRESETS["rrpo"]), False))
    out.append(("rrpo/response_kl", dict(fk.LOSS_PRESETS["rrpo"]), True))
    return out


def step(loss_fn, w, seqs, hc, kl_response: bool) -> float:
    """One forward + backward; seconds."""
    states = []
    for name in SEQ_NAMES:
        s = seqs[name]
        s.policy.grad = None
        kl = (s.targets != -100).to(s.mask.dtype) if kl_response and name == "chosen" else None
        states.append(fk.SequenceStates(s.policy, s.ref, s.targets, s.mask, kl))
    t0 = time.perf_counter()
    loss_fn(w, *states, has_corrupt=hc).loss.backward()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--resp", type=int, default=64, help="response tokens per sequence")
    p.add_argument("--span", type=int, default=8, help="span tokens inside the response")
    p.add_argument("--d", type=int, default=448)
    p.add_argument("--v", type=int, default=19008)
    p.add_argument("--impl", default="torch")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    a = p.parse_args(argv)
    w, seqs, hc = make_inputs(a.b, a.seq_len, a.resp, a.span, a.d, a.v, torch.float32, "cpu")
    runs = [(name, fk.FiReMPOLoss(impl=a.impl, **kw), kl) for name, kw, kl in variants()]
    times = {name: [] for name, _, _ in runs}
    for _name, loss_fn, kl in runs:  # warm-up
        step(loss_fn, w, seqs, hc, kl)
    for _ in range(a.repeats):
        for name, loss_fn, kl in runs:
            times[name].append(step(loss_fn, w, seqs, hc, kl))
    base = statistics.median(times["fire_mpo/sigmoid"])
    print(f"# FiReMPOLoss fwd+bwd, impl {a.impl}, fp32, B={a.b} L={a.seq_len} resp={a.resp} "
          f"span={a.span} D={a.d} V={a.v}, {torch.get_num_threads()} threads, "
          f"{_device_name('cpu')}, median of {a.repeats}")  # fmt: skip
    print("| variant | median ms | vs fire_mpo/sigmoid |\n|---|---|---|")
    for name in times:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
