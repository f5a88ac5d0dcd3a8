"""Peak memory and time of one FiRe-MPO loss forward+backward: ours against the materialized
path, Liger-Kernel and the matmul floor, on the same inputs.

    python -m benchmarks.loss_memory                      # B=4, L=64 (32 masked), D=3584, V=152064
    python -m benchmarks.loss_memory --d 512 --v 32000   # a quick run
    python -m benchmarks.loss_memory --weight-grad       # the head is trained too (dW computed)
    python -m benchmarks.loss_memory --modes ours,ours_recompute,floor,liger_jsd_b0,liger_jsd_b1 \
        --repeats 3 --rounds 2                            # the issue-17 comparison

The setting: 4 sequences per example ((v, y+), (v, y−), (v', y+), (v', y−)), each through the
policy and the frozen reference (8 passes), B examples, every sequence ``--seq-len`` response
positions of which ``--masked`` (random ones) carry span weight 1, fp32 on the CPU. The
backbone is not run; its last hidden states are random leaves (policy ones require grad).

Modes (each in a FRESH subprocess so no mode sees another's allocations):

- ``materialized``: a naive trainer: full-vocabulary logits for every response position of all
  8 passes (reference ones under ``no_grad``), ``log_softmax``, gather, masked sums, the KL from
  the full distributions on (v, y+), autograd for the backward.
- ``materialized_masked``: the same, but logits only at the masked positions (lever 1 alone).
- ``ours``: ``fgpo_kernels.FiReMPOLoss(impl=...)`` (one fused pass over the masked rows; with
  the frozen head its gradients come from the forward, docs/design.md §3.8).
- ``ours_recompute``: the same with ``FGPO_GRADS_IN_FORWARD=off`` (logits recomputed in the
  backward).
- ``floor``: only the matmuls the loss must do on its masked rows (2 logit matmuls + dH, + dW
  with ``--weight-grad``; ``benchmarks/floor.py``).
- ``liger_jsd_b0`` / ``liger_jsd_b1``: Liger-Kernel's chunked fused linear JSD (compiled, as
  shipped) at β = 0 / 1 on the same masked rows of all four sequences: ONE KL direction, no
  log-probs, no preference terms. It always computes the (V, D) weight gradient.

Each process runs ``--warmup`` untimed steps, ``--repeats`` timed steps (median: ``total_s``),
then the memory step: the process's peak resident set during the step minus its resident set
just before it (``VmHWM`` reset through ``/proc/self/clear_refs``; freed blocks handed back to
the OS first, as ``benchmarks.run`` does). ``fwd_s``/``bwd_s``/``cpu_s`` are that step's.
Memory includes the gradients the step produces. ``matmul_frac``: the FLOPs of the required
matmuls (2·rows·D·V each) per second over ``torch.mm``'s rate measured at the start of the run.
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
MODES = ("materialized", "materialized_masked", "ours", "ours_recompute", "floor",
         "liger_jsd_b0", "liger_jsd_b1")  # fmt: skip
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


def _masked_rows(seqs) -> tuple:
    """The span-weighted rows of every sequence: policy (with grad), reference, targets."""
    hs, hrs, ys = [], [], []
    for seq in seqs.values():
        ex, pos = (seq.mask != 0).nonzero().unbind(-1)
        hs.append(seq.policy[ex, pos])
        hrs.append(seq.ref[ex, pos])
        ys.append(seq.targets[ex, pos])
    return torch.cat(hs), torch.cat(hrs), torch.cat(ys)


def _step(args, w, seqs, hc, cfg):
    """A closure: one forward of ``args.mode`` that returns the scalar to backpropagate."""
    from fgpo_kernels import FiReMPOLoss

    if args.mode in ("ours", "ours_recompute"):
        if args.mode == "ours_recompute":
            os.environ["FGPO_GRADS_IN_FORWARD"] = "off"  # this process only
        loss_fn = FiReMPOLoss(impl=args.impl, **cfg)
        return lambda: loss_fn(w, *(seqs[k] for k in NAMES), has_corrupt=hc).loss
    if args.mode.startswith("materialized"):
        masked = args.mode == "materialized_masked"
        return lambda: materialized_loss(w, seqs, hc, cfg, masked)
    if args.mode == "floor":
        from .floor import token_kl_floor

        return lambda: token_kl_floor(*_masked_rows(seqs)[:2], w)
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                  beta=0.0 if args.mode.endswith("b0") else 1.0)  # fmt: skip

    def liger():
        h, hr, y = _masked_rows(seqs)
        return mod(h, w, hr, w.detach(), y)

    return liger


def worker(args) -> dict:
    from .run import _strict_malloc

    torch.manual_seed(0)
    w, seqs, hc = make_inputs(args.b, args.seq_len, args.masked, args.d, args.v, args.weight_grad)
    cfg = dict(beta=0.1, alpha=0.01, gamma=0.1, lambda_=0.5)
    fn = _step(args, w, seqs, hc, cfg)
    leaves = [w, *(s.policy for s in seqs.values())]

    def clear():
        for x in leaves:
            x.grad = None

    for _ in range(args.warmup):  # compiles (Liger), first-touch allocations
        fn().backward()
        clear()
    times = []
    for _ in range(args.repeats):  # default malloc settings, as in training
        t0 = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - t0)
        clear()
    # Memory: one more step, every freed block >= 64 KiB handed back to the OS first, so that
    # memory freed by the earlier steps cannot be reused unseen (as benchmarks.run does).
    gc.collect()
    _strict_malloc()
    rss0 = _rss_kib("VmRSS")
    _reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    loss = fn()
    t1 = time.perf_counter()
    loss.backward()
    t2, c2 = time.perf_counter(), time.process_time()
    peak = _rss_kib("VmHWM")
    rows = _masked_rows(seqs)[0].shape[0]
    flops = 2.0 * rows * args.d * args.v * (3 + int(args.weight_grad))
    total = float(torch.tensor(times).median()) if times else t2 - t0
    return dict(
        mode=args.mode, impl=args.impl if args.mode.startswith("ours") else "-", B=args.b,
        seq_len=args.seq_len, masked=args.masked, rows=rows, D=args.d, V=args.v,
        weight_grad=args.weight_grad, threads=torch.get_num_threads(),
        loss=float(loss.detach()), fwd_s=round(t1 - t0, 3), bwd_s=round(t2 - t1, 3),
        total_s=round(total, 3), times_s=[round(t, 3) for t in times], cpu_s=round(c2 - c0, 3),
        tflops=round(flops / total / 1e12, 4),
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
    p.add_argument("--modes", default="materialized,materialized_masked,ours",
                   help=f"comma list of {MODES}")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (Liger compiles)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per process (median)")
    p.add_argument("--rounds", type=int, default=1, help="run all modes this many times, "
                   "interleaved (medians over rounds in the summary)")  # fmt: skip
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="append the results as JSON lines to this file")
    args = p.parse_args(argv)
    if args.one:
        print(MARK + json.dumps(worker(args)), flush=True)
        return 0
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; expected some of {MODES}")
    from .run import _device_name, _matmul_rate

    rate = _matmul_rate("cpu", "float32", 2048)  # TFLOP/s of torch.mm here, now
    print(f"{_device_name('cpu')}, {torch.get_num_threads()} threads; matmul rate "
          f"{rate:.3f} TFLOP/s (2048^3 fp32)", flush=True)  # fmt: skip
    rows = []
    for rnd in range(args.rounds):
        for mode in modes:
            row = _run_one(args, mode)
            if row is None:
                continue
            row.update(round=rnd, matmul_tflops=round(rate, 4),
                       matmul_frac=round(row["tflops"] / rate, 3))  # fmt: skip
            rows.append(row)
            print(
                f"{mode:20s} loss={row['loss']:.6f} total={row['total_s']:.2f}s "
                f"(fwd {row['fwd_s']:.2f}s + bwd {row['bwd_s']:.2f}s) "
                f"peak_extra={row['peak_extra_mib']:.0f} MiB "
                f"matmul share {row['matmul_frac']:.0%} (load1 {row['load1']:.1f})",
                flush=True,
            )
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    _summary(rows)
    return 0


def _run_one(args, mode: str) -> dict | None:
    """One mode in a fresh process; its result row (None, with the error printed, on failure)."""
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--one", "--mode", mode]
    for k in ("b", "seq_len", "masked", "d", "v", "impl", "warmup", "repeats"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.weight_grad:
        cmd.append("--weight-grad")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(MARK)]
    if res.returncode or not lines:
        print(f"{mode}: failed (rc {res.returncode})\n{res.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(MARK) :])


def _summary(rows: list[dict]) -> None:
    """Per mode: median time and peak over the rounds, and time relative to Liger's."""
    by = {}
    for r in rows:
        by.setdefault(r["mode"], []).append(r)
    med = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # the lower median: a real measurement
    t = {m: med([r["total_s"] for r in rs]) for m, rs in by.items()}
    liger = min((t[m] for m in ("liger_jsd_b0", "liger_jsd_b1") if m in t), default=None)
    print("\n| mode | time p50 (s) | peak extra (MiB) | matmul share | vs fastest Liger |")
    print("|---|---|---|---|---|")
    for m, rs in by.items():
        peak = med([r["peak_extra_mib"] for r in rs])
        share = med([r["matmul_frac"] for r in rs])
        vs = f"{t[m] / liger:.2f}x" if liger else ""
        print(f"| {m} | {t[m]:.2f} | {peak:.0f} | {share:.0%} | {vs} |")


if __name__ == "__main__":
    raise SystemExit(main())
