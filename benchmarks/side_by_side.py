"""Time of every impl on ONE case, interleaved in one process: for a CPU shared with other jobs.

    python -m benchmarks.side_by_side --out benchmarks/results/cpu/side_by_side.csv
    python -m benchmarks.side_by_side --impls torch liger_jsd_b0 matmul_floor --rounds 7

``benchmarks.run`` gives each (case, impl) a fresh process, which its memory measurement needs;
its times are taken minutes apart, so on a machine that other jobs share they compare
different loads (one such run read our op 2.5x slower than the same op minutes later). Here
the impls run round-robin in one process (the order rotated every round), each forward +
backward timed in wall and in process CPU time, and the medians over rounds are compared.
With ``--threads 1`` the CPU time counts this process's own work, which other jobs slow down
far less than the wall clock (cache and memory bandwidth are still shared). ``matmul_floor``
(the op's matmuls alone: 2 logit matmuls + dH (+ dW), ``benchmarks/floor.py``) measured in
the same rounds gives the share of the matmul rate directly: floor time / impl time. Peak
memory is not measured here (one process holds every impl's inputs); take it from
``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

from . import impls as impls_mod
from .run import _device_name, _git_commit
from .shapes import Case

COLUMNS = [
    "op", "impl", "N", "D", "V", "dtype", "grad_w", "threads", "rounds", "wall_p50_s",
    "cpu_p50_s", "cpu_vs_peer", "peer", "floor_share", "note", "cpu", "load1", "commit",
    "timestamp",
]  # fmt: skip


def _build(impl: str, case: Case, grad_w: bool):
    """(fn, leaves, note, env): a variant's environment is applied around each of its calls,
    not left set for the impls that run after it."""
    base, env = impls_mod.VARIANTS.get(impl, (impl, {}))
    with impls_mod.env_switch(env):
        fn, leaves, note = impls_mod.build(base, case, "cpu", grad_w=grad_w)
    return fn, leaves, note, env


def _step(fn, leaves, env) -> tuple[float, float]:
    """One forward + backward: (wall seconds, process CPU seconds)."""
    with impls_mod.env_switch(env):
        c0, t0 = time.process_time(), time.perf_counter()
        fn().backward()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for leaf in leaves:
        leaf.grad = None
    return wall, cpu


def run(case: Case, impls: list[str], rounds: int, grad_w: bool, peer: str) -> list[dict]:
    """Rows per impl: medians over ``rounds`` interleaved rounds (after one warm-up each)."""
    built = {name: _build(name, case, grad_w) for name in impls}
    for fn, leaves, _, env in built.values():  # warm-up: compiles (Liger), caches
        _step(fn, leaves, env)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in impls}
    loads = []
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for name in order:
            fn, leaves, _, env = built[name]
            times[name].append(_step(fn, leaves, env))
        loads.append(os.getloadavg()[0])
        done = {n: round(times[n][-1][1], 2) for n in impls}
        print(f"round {r + 1}/{rounds} (CPU s): {done}", flush=True)
    med = {n: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
           for n, ts in times.items()}  # fmt: skip
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for name in impls:
        wall, cpu = med[name]
        rows.append({
            "op": case.op, "impl": name, "N": case.n, "D": case.d, "V": case.v,
            "dtype": case.dtype, "grad_w": grad_w, "threads": _threads(), "rounds": rounds,
            "wall_p50_s": round(wall, 6), "cpu_p50_s": round(cpu, 6),
            "cpu_vs_peer": round(cpu / med[peer][1], 3) if peer in med else "",
            "peer": peer if peer in med else "",
            "floor_share": round(med["matmul_floor"][1] / cpu, 3) if "matmul_floor" in med else "",
            "note": built[name][2], "cpu": _device_name("cpu"),
            "load1": round(statistics.mean(loads), 2), "commit": _git_commit(), "timestamp": stamp,
        })  # fmt: skip
    return rows


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def table(rows: list[dict]) -> str:
    """Markdown: impl, CPU and wall medians, CPU time vs the peer, share of the matmul rate."""
    peer = rows[0]["peer"] or "peer"
    out = [f"| impl | CPU time p50 | wall p50 | CPU time vs {peer} | matmul share | note |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        share = f"{r['floor_share']:.0%}" if r["floor_share"] != "" else ""
        vs = f"{r['cpu_vs_peer']:.2f}x" if r["cpu_vs_peer"] != "" else ""
        out.append(f"| {r['impl']} | {r['cpu_p50_s']:.2f} s | {r['wall_p50_s']:.2f} s | {vs} | "
                   f"{share} | {r['note']} |")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="token_kl", choices=["token_kl", "token_logprobs"])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--impls", nargs="+",
                   default=["torch", "torch_recompute", "liger_jsd_b0", "liger_jsd_b1",
                            "matmul_floor"])  # fmt: skip
    p.add_argument("--peer", default="liger_jsd_b0", help="the impl the CPU times are divided by")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frozen-weight", action="store_true", help="the head takes no gradient")
    p.add_argument("--out", default=None, help="append the rows to this CSV")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    case = Case(args.op, args.n, args.d, args.v, "float32", "side_by_side")
    for name in args.impls:
        reason = impls_mod.skip_reason(name, case, "cpu", interpreter_ok=False)
        if reason:
            p.error(f"--impls: {name} cannot run here: {reason}")
    import torch

    torch.set_num_threads(args.threads)
    rows = run(case, list(args.impls), args.rounds, not args.frozen_weight, args.peer)
    print(f"\n{args.op} N={args.n} D={args.d} V={args.v} fp32 forward+backward, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds, {rows[0]['cpu']}, "
          f"mean load {rows[0]['load1']}\n")  # fmt: skip
    print(table(rows))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"\nappended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
