"""Peak memory and time of ONE FiRe-MPO loss forward+backward: materialized path vs ours.

    python -m benchmarks.loss_memory                      # B=4, L=64 (32 masked), D=3584, V=152064
    python -m benchmarks.loss_memory --d 512 --v 32000   # a quick run
    python -m benchmarks.loss_memory --weight-grad       # the head is trained too (dW computed)

The setting is the issue's: 4 sequences per example ((v, y+), (v, y−), (v', y+), (v', y−)), each
through the policy and the frozen reference (8 passes), B examples, every sequence ``--seq-len``
response positions of which ``--masked`` (random ones) carry span weight 1, fp32 on the CPU.
The backbone is not run; its last hidden states are random leaves (policy ones require grad).

Modes (each in a FRESH subprocess so no mode sees another's allocations):

- ``materialized``: a naive trainer: full-vocabulary logits for every response position of all
  8 passes (reference ones under ``no_grad``), ``log_softmax``, gather, masked sums, the KL from
  the full distributions on (v, y+), autograd for the backward.
- ``materialized_masked``: the same, but logits only at the masked positions (lever 1 alone).
- ``ours``: ``fgpo_kernels.FiReMPOLoss(impl=...)`` (one fused pass over the masked rows).

Memory = the process's peak resident set during the step minus its resident set just before it
(``VmHWM`` is reset through ``/proc/self/clear_refs`` first). Time is wall-clock (forward,
backward, total) and the process's CPU time (user + system, all threads: steadier than wall
time on a shared machine). Memory includes the gradients the step produces (the hidden-state
grads; plus the ``(V, D)`` weight grad with ``--weight-grad``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

NAMES = ("chosen", "rejected", "chosen_corrupt", "rejected_corrupt")
MODES = ("materialized", "materialized_masked", "ours")
MARK = "@@LOSS_MEMORY@@ "


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def make_inputs(b, seq_len, masked, d, v, weight_grad, seed=0):
    from fgpo_kernels import SequenceStates

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g).mul_(2.0 / math.sqrt(d))  # in place: no temporaries
    w.requires_grad_(weight_grad)
    seqs = {}
    for name in NAMES:
        pol = torch.randn(b, seq_len, d, generator=g)
        ref = pol + 0.3 * torch.randn(b, seq_len, d, generator=g)
        tgt = torch.randint(0, v, (b, seq_len), generator=g)
        mask = torch.zeros(b, seq_len)
        for i in range(b):
            mask[i, torch.randperm(seq_len, generator=g)[:masked]] = 1.0
        seqs[name] = SequenceStates(pol.requires_grad_(), ref, tgt, mask)
    has_corrupt = torch.ones(b, dtype=torch.bool)
    return w, seqs, has_corrupt


def materialized_loss(w, seqs, has_corrupt, cfg, masked_only):
    """The objective from full logits (the naive way); returns the scalar loss."""
    beta, alpha, gamma, lam = cfg["beta"], cfg["alpha"], cfg["gamma"], cfg["lambda_"]
    big_r, kl = {}, None
    for name, s in seqs.items():
        b, seq_len, d = s.policy.shape
        m = s.mask.reshape(-1)
        h, hr, t = s.policy.reshape(-1, d), s.ref.reshape(-1, d), s.targets.reshape(-1)
        ex = torch.arange(b).repeat_interleave(seq_len)
        if masked_only:
            idx = (m != 0).nonzero().squeeze(-1)
            h, hr, t, m, ex = h[idx], hr[idx], t[idx], m[idx], ex[idx]
        logp = torch.log_softmax(h @ w.T, dim=-1)
        with torch.no_grad():
            logr = torch.log_softmax(hr @ w.detach().T, dim=-1)
        rho = logp.gather(-1, t[:, None]).squeeze(-1) - logr.gather(-1, t[:, None]).squeeze(-1)
        big_r[name] = torch.zeros(b).index_add(0, ex, m * rho)
        if name == "chosen":
            fkl = (logr.exp() * (logr - logp)).sum(-1)
            rkl = (logp.exp() * (logp - logr)).sum(-1)
            kl = torch.zeros(b).index_add(0, ex, m * (lam * fkl + (1 - lam) * rkl))
        del logp, logr
    rc, rr, rcc, rrc = (big_r[k] for k in NAMES)
    rank = -F.logsigmoid(beta * (rc - rr))
    visual = -has_corrupt.float() * F.logsigmoid(beta * (rrc - rcc))
    return (rank + gamma * visual + alpha * kl).mean()


def worker(args) -> dict:
    from fgpo_kernels import FiReMPOLoss

    torch.manual_seed(0)
    w, seqs, hc = make_inputs(args.b, args.seq_len, args.masked, args.d, args.v, args.weight_grad)
    cfg = dict(beta=0.1, alpha=0.01, gamma=0.1, lambda_=0.5)
    loss_fn = FiReMPOLoss(impl=args.impl, **cfg)
    chosen, rejected, cc, rc = (seqs[k] for k in NAMES)
    gc.collect()
    rss0 = _rss_kib("VmRSS")
    _reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    if args.mode == "ours":
        loss = loss_fn(w, chosen, rejected, cc, rc, has_corrupt=hc).loss
    else:
        loss = materialized_loss(w, seqs, hc, cfg, args.mode == "materialized_masked")
    t1 = time.perf_counter()
    loss.backward()
    t2, c2 = time.perf_counter(), time.process_time()
    peak = _rss_kib("VmHWM")
    return dict(
        mode=args.mode, impl=args.impl if args.mode == "ours" else "-", B=args.b,
        seq_len=args.seq_len, masked=args.masked, D=args.d, V=args.v,
        weight_grad=args.weight_grad, threads=torch.get_num_threads(),
        loss=float(loss.detach()), fwd_s=round(t1 - t0, 3), bwd_s=round(t2 - t1, 3),
        total_s=round(t2 - t0, 3), cpu_s=round(c2 - c0, 3),
        peak_extra_mib=round((peak - rss0) / 1024, 1), rss_before_mib=round(rss0 / 1024, 1),
        load1=os.getloadavg()[0],
        chunk_elems=os.environ.get("FGPO_TORCH_CHUNK_ELEMS", "default"),
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64, help="response positions per sequence")
    p.add_argument("--masked", type=int, default=32, help="span-masked positions per sequence")
    p.add_argument("--d", type=int, default=3584)
    p.add_argument("--v", type=int, default=152064)
    p.add_argument("--impl", default="torch", help="impl of ours (torch / triton / cuda)")
    p.add_argument("--weight-grad", action="store_true", help="the head weight requires grad")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="append the results as JSON lines to this file")
    args = p.parse_args(argv)
    if args.one:
        print(MARK + json.dumps(worker(args)), flush=True)
        return 0
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; expected some of {MODES}")
        cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--one", "--mode", mode]
        for k in ("b", "seq_len", "masked", "d", "v", "impl"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.weight_grad:
            cmd.append("--weight-grad")
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith(MARK)]
        if res.returncode or not lines:
            print(f"{mode}: failed (rc {res.returncode})\n{res.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(lines[-1][len(MARK) :])
        rows.append(row)
        print(
            f"{mode:20s} loss={row['loss']:.6f} fwd={row['fwd_s']:.2f}s bwd={row['bwd_s']:.2f}s "
            f"total={row['total_s']:.2f}s cpu={row['cpu_s']:.1f}s "
            f"peak_extra={row['peak_extra_mib']:.0f} MiB "
            f"(load1 {row['load1']:.1f})",
            flush=True,
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
