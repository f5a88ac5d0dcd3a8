"""GPU check of impl "cuda": correctness against float64, then timings against impl "triton".

Usage (on a GPU machine, after ``pip install --no-deps --no-build-isolation -e .``):
    python benchmarks/gpu_cuda_check.py --out DIR [--quick]

1. Correctness: relative error (norm) of lse/fkl/rkl and of every gradient against the float64
   chunked path on the same rounded inputs, for cuda, triton and the materialized path in the
   same dtype (docs/design.md §4: cuda must stay within 2x of the materialized error + atol).
2. Timing (CUDA events, median of repeats, rotating input sets): forward, forward+backward with
   LoRA-style gradients (hidden states only) and with the weight gradient, for cuda and triton,
   with achieved TFLOP/s, useful (the matmul FLOPs the op must do) and executed (recomputation
   counted, for the plan the op took), against a measured bf16 torch.mm
   ceiling. Writes DIR/gpu_cuda_check.json and DIR/gpu_cuda_check.csv; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fgpo_kernels as fk  # noqa: E402
from benchmarks.impls import PlanLog, split_by_plan  # noqa: E402
from fgpo_kernels import _registry, torch_impl  # noqa: E402
from fgpo_kernels._backend import Needs, RowGrads, RowStats  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def make(mode, n, d, v, dtype, seed, dr=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dr = dr or d
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32)
    h = rnd(n, d).to(dtype)
    hr = (h.float() + 0.3 * rnd(n, d) if mode == "shared" else rnd(n, dr)).to(dtype)
    w = (rnd(v, d) * (3 / math.sqrt(d))).to(dtype)
    wr = (rnd(v, dr) * (3 / math.sqrt(dr))).to(dtype) if mode == "separate" else None
    gs = [rnd(n) for _ in range(4)]
    return [h, hr, w, wr], gs


def materialized_fwd(h, hr, w, wr, t):
    z = (h @ w.T).float() / t
    zr = (hr @ (w if wr is None else wr).T).float() / t
    lse, lser = torch.logsumexp(z, -1), torch.logsumexp(zr, -1)
    logp, logr = z - lse[:, None], zr - lser[:, None]
    d = logp - logr
    return lse, lser, -(logr.exp() * d).sum(-1), (logp.exp() * d).sum(-1)


def correctness(quick: bool) -> list[dict]:
    rows = []
    shapes = [("shared", 257, 512, 32003), ("separate", 129, 256, 10007)]
    if not quick:
        shapes.append(("shared", 1024, 1024, 65537))
    impls = [i for i in ("cuda", "triton") if _registry.status(i)["available"]]
    for mode, n, d, v in shapes:
        for dtype in (torch.bfloat16, torch.float16):
            low, gs = make(mode, n, d, v, dtype, seed=n + v)
            exact = [None if x is None else x.double() for x in low]
            t = 0.9
            ref = torch_impl.forward(*exact, t)
            need = Needs(True, True, True, mode == "separate")
            gs64 = RowGrads(*(g.double() for g in gs))
            ref_b = torch_impl.backward(*exact, t, ref, gs64, need)
            base = materialized_fwd(*low, t)
            row = {"mode": mode, "n": n, "d": d, "v": v, "dtype": str(dtype).split(".")[-1]}
            for nm, b, c in zip(("lse", "lser", "fkl", "rkl"), ref, base):
                row[f"materialized_{nm}"] = rel(c, b)
            for impl in impls:
                mod = _registry.module(impl)
                out = mod.forward(*low, t)
                for nm, a, b in zip(("lse", "lser", "fkl", "rkl"), out, ref):
                    row[f"{impl}_{nm}"] = rel(a, b)
                st = RowStats(*(x.float() for x in ref))
                outb = mod.backward(*low, t, st, RowGrads(*gs), need)
                for nm, a, b in zip(("dh", "dhr", "dw", "dwr"), outb, ref_b):
                    if b is not None:
                        row[f"{impl}_{nm}"] = rel(a, b)
            if "cuda" in impls:
                row["cuda_ok"] = all(
                    row[f"cuda_{nm}"] <= 2 * row[f"materialized_{nm}"] + 1e-4
                    for nm in ("lse", "lser", "fkl", "rkl")
                ) and all(row[k] <= 2e-2 for k in row if k.startswith("cuda_d"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del low, exact, ref, ref_b
            torch.cuda.empty_cache()
    return rows


def bench(fn, reps: int, sets: int) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds with CUDA events; fn(i) runs input set i % sets."""
    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i % sets)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return q(0.2), q(0.5), q(0.8)


def mm_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    _, ms, _ = bench(lambda i: a @ b, 20, 1)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def timing(quick: bool) -> list[dict]:
    shapes = [(256, 3584, 152064), (2048, 4096, 32000)]
    if not quick:
        shapes.append((8192, 3584, 152064))
    impls = [i for i in ("cuda", "triton") if _registry.status(i)["available"]]
    rows = []
    reps = 5 if quick else 10
    for n, d, v in shapes:
        sets = 2
        inputs = [make("shared", n, d, v, torch.bfloat16, seed=s) for s in range(sets)]
        tgt = torch.randint(0, v, (n,), device="cuda")
        # Useful matmul FLOPs (design §4.4): forward 2 logit dots; backward dh (hr takes no
        # gradient here) and, with the shared head trained, dW from both sides (G^T h + Gr^T hr).
        # Executed FLOPs add what the plan the op took recomputes (impls.executed_by_plan).
        one = 2 * n * v * d
        f_fwd = 2 * one
        for impl in impls:
            for kind in ("fwd", "fwd+bwd(h)", "fwd+bwd(h,w)"):
                leaves = []
                for (h, hr, w, _), _ in inputs:
                    hh = h.detach().clone().requires_grad_(kind != "fwd")
                    ww = w.detach().clone().requires_grad_(kind == "fwd+bwd(h,w)")
                    leaves.append((hh, hr, ww))

                def run(i, impl=impl, kind=kind, leaves=leaves, tgt=tgt):
                    hh, hr, ww = leaves[i]
                    if kind == "fwd":
                        with torch.no_grad():
                            fk.token_kl(hh, hr, ww, targets=tgt, impl=impl)
                        return
                    hh.grad = None
                    ww.grad = None
                    o = fk.token_kl(hh, hr, ww, targets=tgt, impl=impl)
                    (o.loss + o.policy_logps.sum()).backward()

                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                try:
                    with PlanLog() as plans:
                        p20, p50, p80 = bench(run, reps, sets)
                except Exception as exc:  # report and go on (e.g. out of memory)
                    print(f"{impl} {kind} n={n}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
                bwd = {"fwd": 0, "fwd+bwd(h)": one, "fwd+bwd(h,w)": 3 * one}[kind]
                plan = plans.plan() if kind != "fwd" else "forward"
                executed = split_by_plan(plan, f_fwd, bwd, 3 * one).get("full", 0.0)
                executed = f_fwd if kind == "fwd" else executed
                rate = lambda f, p50=p50: f / (p50 * 1e-3) / 1e12 if f else None
                row = {"impl": impl, "kind": kind, "n": n, "d": d, "v": v, "p20_ms": p20,
                       "p50_ms": p50, "p80_ms": p80, "useful_tflops": rate(f_fwd + bwd),
                       "plan": plan, "exec_tflops": rate(executed),
                       "peak_extra_mib": peak}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = fk.backend_status()
    info = {
        "device": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "status": status,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        info["commit"] = ""
    print(json.dumps(info, default=str), flush=True)
    res = {"info": info, "correctness": correctness(args.quick)}
    if not args.skip_timing:
        res["ceiling_tflops"] = mm_ceiling()
        res["timing"] = timing(args.quick)
    (out / "gpu_cuda_check.json").write_text(json.dumps(res, indent=1, default=str))
    if res.get("timing"):
        keys = list(res["timing"][0])
        lines = [",".join(["device", "commit", *keys])]
        for r in res["timing"]:
            lines.append(",".join([info["device"], info["commit"], *(str(r[k]) for k in keys)]))
        (out / "gpu_cuda_check.csv").write_text("\n".join(lines) + "\n")
    print("\n== correctness (rel err vs float64; cuda_ok = within 2x materialized + atol)")
    for r in res["correctness"]:
        cols = [f"{k}={v:.1e}" for k, v in r.items() if k.startswith("cuda_") and k != "cuda_ok"]
        print(f"{r['mode']:8s} n={r['n']} v={r['v']} {r['dtype']}: ok={r.get('cuda_ok')}",
              " ".join(cols))  # fmt: skip
    if res.get("timing"):
        print(f"\n== timing (bf16, median ms; matmul ceiling {res['ceiling_tflops']:.0f} TFLOP/s)")
        for r in res["timing"]:
            print(f"{r['impl']:6s} {r['kind']:13s} n={r['n']:5d} d={r['d']} v={r['v']}: "
                  f"{r['p50_ms']:8.2f} ms {r['useful_tflops']:6.1f} useful / "
                  f"{r['exec_tflops'] or 0:6.1f} executed TFLOP/s ({r['plan']}) "
                  f"peak+{r['peak_extra_mib']:.0f} MiB")  # fmt: skip
    bad = [r for r in res["correctness"] if r.get("cuda_ok") is False]
    return 1 if bad or not status["cuda"]["available"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
