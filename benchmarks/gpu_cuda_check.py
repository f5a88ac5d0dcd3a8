"""GPU check of impl "cuda": correctness against float64, then timings against impl "triton".

Usage (on a GPU machine, after ``pip install --no-deps --no-build-isolation -e .``):
    python benchmarks/gpu_cuda_check.py --out DIR [--quick]

impl "cuda" has two forward kernels (env ``FGPO_CUDA_FWD``): "wgmma" (sm_90a) and "mma"
(mma.sync). Each is checked and timed where it can run here (``benchmarks.impls.cuda_fwd_paths``:
the extension's ``_C.WGMMA``, the device, ``cuda_kl.forward_path``); one that cannot gets rows
"skipped" with the reason.

1. Correctness: relative error (norm) of lse/fkl/rkl (per forward path: ``cuda_<path>_lse``, ...)
   and of every gradient against the float64 chunked path (impl "torch") on the same rounded
   inputs, for cuda, triton and the materialized path in the same dtype (docs/design.md §4:
   cuda must stay within 2x of the materialized error + atol, on every path that ran).
2. Timing (CUDA events, median of repeats, rotating input sets): the forward of each CUDA path
   next to its PREDICTED time (``benchmarks.gpu_model`` on the matmul rate measured here: the
   datasheet of this GPU, matched by name and SM count, else no prediction), and forward+backward
   with LoRA-style gradients (hidden states only) and with the weight gradient on the default
   path, for cuda and triton, with achieved TFLOP/s, useful (the matmul FLOPs the op must do)
   and executed (recomputation counted, for the plan the op took), against a measured bf16
   torch.mm ceiling.
Writes DIR/gpu_cuda_check.json, DIR/gpu_cuda_check.csv (one row per timing, skipped paths too)
and DIR/cuda_fwd_path.txt (the default CUDA forward here, for ``gpu_model --cuda-path``); prints a
table last. Without a GPU (the session's dry run) only the skipped path rows, with their
predictions on the H200 datasheet, and the reason.
"""

from __future__ import annotations

import argparse
import csv
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
from benchmarks.impls import (  # noqa: E402
    CUDA_FWD_PATHS,
    PlanLog,
    cuda_fwd_paths,
    env_switch,
    split_by_plan,
)
from fgpo_kernels import _registry, torch_impl  # noqa: E402
from fgpo_kernels._backend import Needs, RowGrads, RowStats  # noqa: E402
from fgpo_kernels._util import no_cuda_reason  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


# Where the checks run, and their shapes (tests/test_gpu_session.py rehearses the GPU branch on
# "cpu" at tiny shapes with stand-in kernels).
DEVICE = "cuda"
CORRECTNESS_SHAPES = [("shared", 257, 512, 32003), ("separate", 129, 256, 10007)]  # + quick
TIMING_SHAPES = [(256, 3584, 152064), (2048, 4096, 32000)]  # + (8192, 3584, 152064) unless quick


def make(mode, n, d, v, dtype, seed, dr=None):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dr = dr or d
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=torch.float32)
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


def _runs(paths: dict[str, str | None]) -> list[tuple[str, str]]:
    """(impl, CUDA forward path) of every forward to run: cuda on each path that can run here
    (``paths``: path -> None or why not), then triton ("" = no path)."""
    runs = [("cuda", p) for p in CUDA_FWD_PATHS if paths[p] is None]
    return runs + [("triton", "")] * _registry.status("triton")["available"]


def _fwd_env(path: str) -> dict:
    return {"FGPO_CUDA_FWD": path} if path else {}


def correctness(quick: bool, paths: dict[str, str | None]) -> list[dict]:
    rows = []
    shapes = list(CORRECTNESS_SHAPES)
    if not quick:
        shapes.append(("shared", 1024, 1024, 65537))
    runs = _runs(paths)
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
            backward_done = set()
            for impl, path in runs:
                mod = _registry.module(impl)
                key = f"{impl}_{path}" if path else impl
                try:
                    with env_switch(_fwd_env(path)):
                        out = mod.forward(*low, t)
                except Exception as exc:  # one path failing must not hide the others
                    row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                for nm, a, b in zip(("lse", "lser", "fkl", "rkl"), out, ref):
                    row[f"{key}_{nm}"] = rel(a, b)
                if impl in backward_done:  # the backward does not depend on the forward path
                    continue
                backward_done.add(impl)
                st = RowStats(*(x.float() for x in ref))
                # impl cuda: its default backward (triton's gblock) and its own kernel, which
                # only FGPO_CUDA_BWD=cuda runs ("cuda_kernel_...")
                kinds = [(impl, {})]
                if impl == "cuda":
                    kinds.append(("cuda_kernel", {"bwd": "cuda"}))
                for label, kw in kinds:
                    outb = mod.backward(*low, t, st, RowGrads(*gs), need, **kw)
                    for nm, a, b in zip(("dh", "dhr", "dw", "dwr"), outb, ref_b):
                        if b is not None:
                            row[f"{label}_{nm}"] = rel(a, b)
            cuda_paths = [p for i, p in runs if i == "cuda"]
            if cuda_paths:
                row["cuda_ok"] = all(
                    row.get(f"cuda_{p}_{nm}", math.inf) <= 2 * row[f"materialized_{nm}"] + 1e-4
                    for p in cuda_paths
                    for nm in ("lse", "lser", "fkl", "rkl")
                ) and all(row[k] <= 2e-2 for k in row if k.startswith(("cuda_d", "cuda_kernel_d")))
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


FIELDS = ["impl", "path", "kind", "n", "d", "v", "p20_ms", "p50_ms", "p80_ms", "useful_tflops",
          "plan", "exec_tflops", "peak_extra_mib", "predicted_ms", "measured_over_predicted",
          "model", "status", "reason"]  # fmt: skip


def model_device() -> tuple[str | None, str]:
    """(``gpu_model.DEVICES`` key of this GPU, or None, and why): the datasheet whose name and SM
    count match the device (an H100 PCIe has 114 SMs, not the SXM part's 132)."""
    from benchmarks import gpu_model

    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    for key, dev in gpu_model.DEVICES.items():
        if key.split("-")[0] in name and dev.sms == sms:
            return key, f"PREDICTED on the {dev.name} datasheet"
    return None, f"no datasheet in benchmarks.gpu_model.DEVICES for {name} ({sms} SMs)"


def predicted_ms(impl: str, path: str, n: int, d: int, v: int, key: str | None,
                 tflops: float | None) -> float | None:  # fmt: skip
    """PREDICTED ms of the token_kl forward (shared head) of ``impl`` / ``path`` on the ``key``
    datasheet with ``tflops`` as the matmul rate (None: the datasheet's peak)."""
    from benchmarks import gpu_model

    if key is None:
        return None
    case, dev = gpu_model.Case(n, d, v, True, False), gpu_model.DEVICES[key]
    if impl == "cuda":
        return gpu_model.cuda_forward(case, dev, tflops, path).seconds * 1e3
    return gpu_model.triton_forward(case, dev, tflops).seconds * 1e3


def skipped_rows(paths: dict[str, str | None], shapes, key: str | None, model: str,
                 tflops: float | None) -> list[dict]:  # fmt: skip
    """A "skipped" forward row, with its prediction, per CUDA path that cannot run here."""
    return [{**dict.fromkeys(FIELDS, ""), "impl": "cuda", "path": p, "kind": "fwd", "n": n,
             "d": d, "v": v, "predicted_ms": predicted_ms("cuda", p, n, d, v, key, tflops),
             "model": model, "status": "skipped", "reason": why}
            for n, d, v in shapes for p, why in paths.items() if why]  # fmt: skip


def timed(runs: list[tuple[str, str]], default: str | None) -> list[tuple[str, str, str]]:
    """(impl, path, kind) of every timing at one shape: the forward of each run (each CUDA path
    that runs here, triton), then forward+backward once per impl, cuda on its default path
    (the backward does not depend on the forward path; the default is what training runs)."""
    todo = [(impl, path, "fwd") for impl, path in runs]
    for impl in dict.fromkeys(i for i, _ in runs):
        path = (default or "") if impl == "cuda" else ""
        todo += [(impl, path, kind) for kind in ("fwd+bwd(h)", "fwd+bwd(h,w)")]
    return todo


def timing(quick: bool, paths: dict[str, str | None], default: str | None,
           ceiling: float) -> list[dict]:  # fmt: skip
    """The forward of every CUDA path (and triton's), then forward+backward on cuda's default
    path and triton, at each shape; skipped paths get a row saying why."""
    shapes = TIMING_SHAPES + ([] if quick else [(8192, 3584, 152064)])
    key, model = model_device()
    runs = _runs(paths)
    rows = []
    reps = 5 if quick else 10
    for n, d, v in shapes:
        sets = 2
        inputs = [make("shared", n, d, v, torch.bfloat16, seed=s) for s in range(sets)]
        tgt = torch.randint(0, v, (n,), device=DEVICE)
        # Useful matmul FLOPs (design §4.4): forward 2 logit dots; backward dh (hr takes no
        # gradient here) and, with the shared head trained, dW from both sides (G^T h + Gr^T hr).
        # Executed FLOPs add what the plan the op took recomputes (impls.split_by_plan).
        one = 2 * n * v * d
        f_fwd = 2 * one
        for impl, path, kind in timed(runs, default):
            leaves = []
            for (h, hr, w, _), _ in inputs:
                hh = h.detach().clone().requires_grad_(kind != "fwd")
                ww = w.detach().clone().requires_grad_(kind == "fwd+bwd(h,w)")
                leaves.append((hh, hr, ww))
            env = _fwd_env(path) if kind == "fwd" else {}  # backward kinds: the default

            def run(i, impl=impl, kind=kind, leaves=leaves, tgt=tgt, env=env):
                hh, hr, ww = leaves[i]
                with env_switch(env):
                    if kind == "fwd":
                        with torch.no_grad():
                            fk.token_kl(hh, hr, ww, targets=tgt, impl=impl)
                        return
                    hh.grad = None
                    ww.grad = None
                    o = fk.token_kl(hh, hr, ww, targets=tgt, impl=impl)
                    (o.loss + o.policy_logps.sum()).backward()

            row = {**dict.fromkeys(FIELDS, ""), "impl": impl, "path": path, "kind": kind,
                   "n": n, "d": d, "v": v}  # fmt: skip
            if kind == "fwd":
                pred = predicted_ms(impl, path, n, d, v, key, ceiling)
                row.update(predicted_ms=pred, model=f"{model}, {ceiling:.0f} TFLOP/s measured"
                           if key else model)  # fmt: skip
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            try:
                with PlanLog() as plans:
                    p20, p50, p80 = bench(run, reps, sets)
            except Exception as exc:  # report and go on (e.g. out of memory)
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            bwd = {"fwd": 0, "fwd+bwd(h)": one, "fwd+bwd(h,w)": 3 * one}[kind]
            plan = plans.plan() if kind != "fwd" else "forward"
            executed = split_by_plan(plan, f_fwd, bwd, 3 * one).get("full", 0.0)
            executed = f_fwd if kind == "fwd" else executed
            rate = lambda f, p50=p50: f / (p50 * 1e-3) / 1e12 if f else None
            row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, useful_tflops=rate(f_fwd + bwd),
                       plan=plan, exec_tflops=rate(executed), peak_extra_mib=peak,
                       status="ok")  # fmt: skip
            if row["predicted_ms"]:
                row["measured_over_predicted"] = p50 / row["predicted_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows + skipped_rows(paths, shapes, key, model, ceiling)


def _line(r: dict) -> str:
    """One timing row for the printed table (skipped and failed rows say why)."""
    head = (f"{r['impl']:6s} {r['path'] or '-':5s} {r['kind']:13s} n={r['n']:5d} d={r['d']} "
            f"v={r['v']}:")  # fmt: skip
    pred = ""
    if r["predicted_ms"] != "" and r["predicted_ms"] is not None:
        pred = f" PREDICTED {r['predicted_ms']:.2f} ms"
        if r["measured_over_predicted"] != "":
            pred += f" (measured / predicted {r['measured_over_predicted']:.2f})"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']};{pred}"
    return (f"{head} {r['p50_ms']:8.2f} ms {r['useful_tflops']:6.1f} useful / "
            f"{r['exec_tflops'] or 0:6.1f} executed TFLOP/s ({r['plan']}) "
            f"peak+{r['peak_extra_mib']:.0f} MiB{pred}")  # fmt: skip


def write(out: Path, res: dict) -> None:
    """DIR/gpu_cuda_check.json (everything) and DIR/gpu_cuda_check.csv (the timing rows)."""
    (out / "gpu_cuda_check.json").write_text(json.dumps(res, indent=1, default=str))
    info = res["info"]
    with (out / "gpu_cuda_check.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["device", "commit", *FIELDS])
        w.writeheader()
        for r in res.get("timing", []):
            w.writerow({"device": info["device"], "commit": info.get("commit", ""), **r})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default, paths = cuda_fwd_paths()
    fwd_paths = {"default": default, "why_not": paths}
    print(json.dumps({"cuda_forward_paths": fwd_paths}), flush=True)
    if default:  # for gpu_model --measured --cuda-path (the bench ran the default)
        (out / "cuda_fwd_path.txt").write_text(default + "\n")
    if not torch.cuda.is_available():
        why = no_cuda_reason()
        print(f"no CUDA device ({why}): nothing to check or time; the CUDA forward paths' "
              "rows below carry their PREDICTED times (H200 SXM datasheet)")  # fmt: skip
        rows = skipped_rows(paths, TIMING_SHAPES, "H200-SXM",
                            "PREDICTED on the H200 SXM datasheet (no GPU here)", None)  # fmt: skip
        write(out, {"info": {"device": "none", "reason": why}, "paths": fwd_paths,
                    "timing": rows})  # fmt: skip
        print("\n".join(map(_line, rows)))
        return 0
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
    res = {"info": info, "paths": fwd_paths, "correctness": correctness(args.quick, paths)}
    if not args.skip_timing:
        res["ceiling_tflops"] = mm_ceiling()
        res["timing"] = timing(args.quick, paths, default, res["ceiling_tflops"])
    write(out, res)
    print("\n== correctness (rel err vs float64; cuda_ok = within 2x materialized + atol)")
    for r in res["correctness"]:
        cols = [f"{k}={v:.1e}" if isinstance(v, float) else f"{k}: {v}"
                for k, v in r.items() if k.startswith("cuda_") and k != "cuda_ok"]  # fmt: skip
        print(f"{r['mode']:8s} n={r['n']} v={r['v']} {r['dtype']}: ok={r.get('cuda_ok')}",
              " ".join(cols))  # fmt: skip
    if res.get("timing"):
        print(f"\n== timing (bf16, median ms; matmul ceiling {res['ceiling_tflops']:.0f} TFLOP/s;"
              f" default CUDA forward: {default or 'unknown'})")  # fmt: skip
        print("\n".join(map(_line, res["timing"])))
    bad = [r for r in res["correctness"] if r.get("cuda_ok") is False]
    return 1 if bad or not status["cuda"]["available"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
