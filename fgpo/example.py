"""A small working example of the fused ops: token_kl and token_logprobs against the
materialized definition, with timing and peak memory of both (CPU, a few seconds)."""

from __future__ import annotations

import time

import torch

import fgpo_kernels as fk


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--impl", default=None, help="torch | triton | cuda (default: best available)")


def run(args) -> int:
    torch.manual_seed(0)
    n, d, v = args.rows, args.hidden, args.vocab
    status = fk.backend_status()
    print(f"backends: { {k: s['available'] for k, s in status.items()} }")
    chosen = fk.resolve_impl(args.impl, "cpu")
    how = "as asked (--impl)" if args.impl else "chosen automatically (FGPO_IMPL or best available)"
    print(f"impl: {chosen}, {how}: {status[chosen]['reason']}")
    h = torch.randn(n, d) * 0.5
    hr = (h + 0.1 * torch.randn(n, d)).requires_grad_(False)
    w = torch.randn(v, d) / d**0.5
    mask = (torch.rand(n) < 0.5).float()
    targets = torch.randint(0, v, (n,))
    results = {}
    for impl in ("reference", chosen):
        hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_()
        t0 = time.perf_counter()
        out = fk.token_kl(hp, hr, wp, mask=mask, targets=targets, impl=impl)
        (out.loss + out.policy_logps.sum()).backward()
        dt = time.perf_counter() - t0
        results[impl] = (out.loss.item(), hp.grad, wp.grad)
        print(f"impl={impl:9s} loss={out.loss.item():.6f} fwd+bwd {dt * 1e3:8.1f} ms")
    (l0, gh0, gw0), (l1, gh1, gw1) = results.values()
    print(
        f"|loss diff|={abs(l0 - l1):.2e}  dh rel err={(gh1 - gh0).norm() / gh0.norm():.2e}  "
        f"dW rel err={(gw1 - gw0).norm() / gw0.norm():.2e}"
    )
    lp = fk.token_logprobs(h, w, targets, impl=chosen)
    print(f"token_logprobs: mean {lp.mean().item():.4f} over {n} rows")
    return 0
