"""Benchmark runner: every impl side by side on the cases of a preset, one CSV row per mode.

    python -m benchmarks.run --quick --device cpu --out DIR          # minutes on 2 CPU cores
    python -m benchmarks.run --preset spec --ops token_kl --out DIR  # design §4 CPU criterion
    python -m benchmarks.run --device cuda --out DIR                 # GPU suite (preset gpu)
    python -m benchmarks.run --list                                  # presets and impls

Each (case, impl) runs in a FRESH subprocess, so that one case's allocations cannot hide or
inflate another's peak. In it: inputs are built, one warm-up step runs (compiles, autotunes),
then each mode is timed ``--repeats`` times (``forward``: the forward with grad enabled;
``backward``: ``loss.backward()`` alone; ``full``: both), then the peak memory of one more
step per mode is taken above the memory held just before it:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step.
- CPU: the process's peak resident set (``VmHWM``) minus its resident set before the step; the
  peak is reset through ``/proc/self/clear_refs`` and, before the memory steps only, glibc is
  told to return every block above 64 KiB to the OS at once (``mallopt``, ``malloc_trim``), so
  memory freed by an earlier step cannot be reused unseen. Timing runs under default malloc
  settings, as training does.

Peak memory includes the gradients the step produces (same for every impl) and whatever the
impl keeps between forward and backward. Rows of impls that cannot run (a peer not installed,
a GPU-only kernel on CPU) are written with ``status=skipped`` and the reason.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from . import impls as impls_mod
from . import report
from .shapes import OPS, Case, default_preset, presets

COLUMNS = [
    "op", "impl", "device", "device_name", "dtype", "N", "D", "V", "mode",
    "p20_ms", "p50_ms", "p80_ms", "peak_mb", "tflops", "matmul_tflops", "matmul_frac",
    "plan", "exec_tflops", "exec_frac",
    "status", "reason", "note", "shape", "seq", "grad_w", "repeats", "threads", "load1",
    "preset", "commit", "version", "peer_version", "torch_version", "timestamp",
]  # fmt: skip
MARK = "@@BENCH@@ "
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- worker


def _rss_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB (Linux)."""
    text = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))
    return rss, hwm


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _strict_malloc() -> None:
    """Make glibc hand every block >= 64 KiB back to the OS on free (memory steps only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _matmul_rate(device: str, dtype: str, size: int) -> float:
    """Measured dense matmul rate (TFLOP/s) of the device in ``dtype`` at size^3."""
    import torch

    dt = impls_mod._dtype(dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(5 if device == "cuda" else 3):
        t0 = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / (4 if device == "cuda" else 1))
    return 2.0 * size**3 / best / 1e12


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def worker(spec: dict) -> dict:
    """Run the cases of ``spec`` (one on CPU; on CUDA all cases of one (op, impl)) in order."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    if spec["kind"] == "matmul":
        rates = {dt: _matmul_rate(device, dt, spec["size"]) for dt in spec["dtypes"]}
        return {"device_name": _device_name(device), "rates": rates}
    for i, c in enumerate(spec["cases"]):
        c = dict(c)
        c["seq"] = tuple(c["seq"]) if c.get("seq") else None
        try:
            res = _run_case(spec, Case(**c), device)
        except Exception as exc:  # e.g. CUDA out of memory: report it, go on with the next
            res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        # One line per case, as soon as it is done: a later crash cannot take it away.
        print(MARK + json.dumps({"index": i, **res}), flush=True)
        if device == "cuda" and "error" in res and "CUDA error" in res["error"]:
            sys.exit(3)  # the context is gone; the parent reruns the rest in fresh processes
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return None


def _run_case(spec: dict, case: Case, device: str) -> dict:
    import torch

    fn, leaves, note = impls_mod.build(
        spec["impl"], case, device, grad_w=spec["grad_w"], liger_eager=spec["liger_eager"]
    )
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def clear():
        for t in leaves:
            t.grad = None

    def once(mode: str) -> float:
        if mode == "forward":
            t0 = time.perf_counter()
            out = fn()
            sync()
            dt = time.perf_counter() - t0
            del out
        elif mode == "backward":
            out = fn()
            sync()
            t0 = time.perf_counter()
            out.backward()
            sync()
            dt = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            fn().backward()
            sync()
            dt = time.perf_counter() - t0
        clear()
        return dt * 1e3

    plans = impls_mod.PlanLog()  # the plan our ops took (their DEBUG log): executed FLOPs
    with plans:
        for _ in range(spec["warmup"]):
            fn().backward()
            clear()
    sync()
    times = {}
    for mode in spec["modes"]:
        ts, start = [], time.perf_counter()
        for i in range(spec["repeats"]):
            ts.append(once(mode))
            if i + 1 >= spec["min_repeats"] and time.perf_counter() - start > spec["max_seconds"]:
                break
        times[mode] = ts

    peaks = {}
    for mode in spec["modes"]:
        gc.collect()
        out = None
        if mode == "backward":
            out = fn()
            sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _strict_malloc()
            if not _reset_hwm():
                peaks[mode] = None
                continue
            base = _rss_kb()[0]
        if mode == "forward":
            out = fn()
        elif mode == "backward":
            out.backward()
        else:
            fn().backward()
        sync()
        if cuda:
            peaks[mode] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peaks[mode] = (_rss_kb()[1] - base) / 1024
        del out
        clear()
    return {"times": times, "peaks": peaks, "note": note, "plan": plans.plan()}


# ----------------------------------------------------------------------------- parent


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=10"],
            cwd=ROOT, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _spawn(spec: dict, timeout: float, interpret: bool) -> tuple[list[dict], str]:
    """Run a worker; (the result lines it printed, why it failed or "")."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", json.dumps(spec)]
    why = ""
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, rc, why = "", None, f"timeout after {timeout:.0f} s"
    found = [json.loads(ln[len(MARK) :]) for ln in stdout.splitlines() if ln.startswith(MARK)]
    if rc not in (0, None):
        tail = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()]
        last = tail[-1].strip() if tail else ""
        if rc < 0:
            last = f"killed by signal {-rc} (out of memory?) {last}".strip()
        why = f"worker failed (rc {rc}): {last}"[:300]
    return found, why


def _fmt(x, nd=2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def parse_args(argv=None) -> argparse.Namespace:
    ps = presets()
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="preset 'quick' (CPU, minutes)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available, else cpu")  # fmt: skip
    ap.add_argument("--preset", choices=sorted(ps), default=None,
                    help="; ".join(f"{k}: {v.help}" for k, v in ps.items()))  # fmt: skip
    ap.add_argument("--ops", nargs="+", choices=OPS, default=None, help="default: all")
    ap.add_argument("--impls", nargs="+", choices=impls_mod.ALL_IMPLS, default=None,
                    help="default: all")  # fmt: skip
    ap.add_argument("--modes", nargs="+", choices=("forward", "backward", "full"), default=None)
    ap.add_argument("--out", default=None, help="directory for results.csv (required to run)")
    ap.add_argument("--append", action="store_true", help="append to DIR/results.csv")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop repeating a mode after this long (>= 2 repeats)")  # fmt: skip
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per subprocess")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--frozen-weight", action="store_true",
                    help="the head does not require grad (LoRA); default: it does")  # fmt: skip
    ap.add_argument("--liger-compile", choices=("on", "off"), default=None,
                    help="torch.compile Liger's CPU chunked losses (Liger's default; costs "
                    "20-40 s per case on 2 cores). Default: on, off for --quick/tiny")  # fmt: skip
    ap.add_argument("--batch", action="store_true",
                    help="a subprocess per (op, impl), not per case (CUDA: always)")  # fmt: skip
    ap.add_argument("--no-matmul-rate", action="store_true", help="skip the matmul-rate probe")
    ap.add_argument("--list", action="store_true", help="print presets and impls, then exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        res = worker(json.loads(args.worker))
        if res is not None:
            print(MARK + json.dumps(res), flush=True)
        return 0

    ps = presets()
    if args.list:
        for k, p in ps.items():
            print(f"{k:8s} {len(p.cases):3d} cases, modes {','.join(p.modes)}: {p.help}")
        for op, names in impls_mod.IMPLS.items():
            print(f"{op}: {', '.join(names)}")
        return 0
    if not args.out:
        print("error: --out DIR is required", file=sys.stderr)
        return 2

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    preset = ps[args.preset or default_preset(device, args.quick)]
    cases = [c for c in preset.cases if args.ops is None or c.op in args.ops]
    modes = tuple(args.modes or preset.modes)
    repeats = args.repeats or preset.repeats
    quick = preset.name in ("quick", "tiny")
    max_seconds = args.max_seconds or (2.0 if quick else 20.0)
    liger_eager = (args.liger_compile or ("off" if quick else "on")) == "off"
    timeout = args.case_timeout or (300.0 if quick else 900.0)
    if device == "cuda":  # a GPU run of the CPU presets: same shapes, device dtype as given
        cases = [c for c in cases if not (c.note == "interpreter")]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "commit": _git_commit(),
        "version": _version(),
        "torch_version": torch.__version__,
        "preset": preset.name,
        "threads": args.threads or (os.cpu_count() if device == "cpu" else ""),
    }

    rates, device_name = {}, _device_name("cpu") if device == "cpu" else device
    if not args.no_matmul_rate:
        dts = sorted({c.dtype for c in cases})
        size = 8192 if device == "cuda" else 2048
        found, why = _spawn(
            {"kind": "matmul", "device": device, "dtypes": dts, "size": size,
             "threads": args.threads},
            timeout=300, interpret=False,
        )  # fmt: skip
        if found:
            rates, device_name = found[0]["rates"], found[0]["device_name"]
            for dt, r in rates.items():
                print(f"matmul rate {device_name} {dt} ({size}^3): {r:.2f} TFLOP/s", flush=True)
        else:
            print(f"matmul rate probe failed: {why}", flush=True)
    meta["device_name"] = device_name

    # (cases, impl) groups, one subprocess each: one case per process on CPU (peak RSS is per
    # process), all cases of one (op, impl) per process on CUDA (allocator stats reset per case).
    groups: list[tuple[list[Case], str]] = []
    rows = []
    skipped: Counter = Counter()
    for case in cases:
        for impl in impls_mod.IMPLS[case.op]:
            if args.impls is not None and impl not in args.impls:
                continue
            reason = impls_mod.skip_reason(impl, case, device, preset.interpreter_ok)
            if reason:
                base = _base_row(case, impl, meta, args, repeats)
                rows.append({**base, "mode": "all", "status": "skipped", "reason": reason})
                skipped[f"{impl}: {reason}"] += 1
                continue
            if device == "cuda" or args.batch:
                for g in groups:
                    if g[1] == impl and g[0][0].op == case.op:
                        g[0].append(case)
                        break
                else:
                    groups.append(([case], impl))
            else:
                groups.append(([case], impl))

    if device == "cuda":  # the design §4 comparisons first, in case the time runs out
        order = ("cuda", "triton", "triton_recompute", "materialized", "liger_jsd_b0",
                 "liger_jsd_b1", "liger_flce",
                 "cce", "torch_lce", "torch")  # fmt: skip
        groups.sort(key=lambda g: order.index(g[1]) if g[1] in order else len(order))
    # A SIGTERM (e.g. from `timeout`) ends the parent through SystemExit, which makes
    # subprocess.run kill the running worker; rows already written stay.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    path = out_dir / "results.csv"
    if not (args.append and path.exists()):
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()
    _write(path, rows)  # the skipped rows; each group's rows follow as soon as it ends
    n_runs = sum(len(g[0]) for g in groups)
    print(
        f"plan: {n_runs} (case, impl) runs in {len(groups)} worker processes; "
        f"{sum(skipped.values())} skipped (rows with status=skipped and the reason in {path})",
        flush=True,
    )
    for why, count in sorted(skipped.items()):
        print(f"  skipped {count:3d} x {why}", flush=True)
    t_all = time.time()
    for k, (gcases, impl) in enumerate(groups, 1):
        spec = {
            "kind": "cases", "cases": [asdict(c) for c in gcases], "impl": impl,
            "device": device, "modes": list(modes), "repeats": repeats,
            "min_repeats": min(2 if quick else 3, repeats), "warmup": args.warmup,
            "max_seconds": max_seconds,
            "grad_w": not args.frozen_weight, "liger_eager": liger_eager, "threads": args.threads,
        }  # fmt: skip
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0 = time.time()
        interp = impl == "triton" and device == "cpu"
        found, why = _spawn(spec, timeout * len(gcases), interpret=interp)
        results = [None] * len(gcases)
        for r in found:
            results[r.pop("index")] = r
        missing = [i for i, r in enumerate(results) if r is None]
        if missing and len(gcases) > 1 and why and not why.startswith("timeout"):
            # the process died mid-batch: run the cases it did not finish one by one
            print(f"[{k}/{len(groups)}] {impl}: worker died ({why}); retrying one by one")
            for i in missing:
                f1, w1 = _spawn({**spec, "cases": [asdict(gcases[i])]}, timeout, interp)
                results[i] = f1[0] if f1 else {"error": w1 or "no result"}
        results = [r if r is not None else {"error": why or "no result"} for r in results]
        for case, res1 in zip(gcases, results):
            new_rows = _case_rows(case, impl, res1, meta, args, repeats, modes, rates, load)
            _write(path, new_rows)
            rows += new_rows
            label = f"[{k}/{len(groups)}] {_label(case, impl)}"
            if "error" in res1:
                print(f"{label}: ERROR {res1['error']}", flush=True)
            else:
                parts = [f"{m} {_percentile(res1['times'][m], 0.5):.1f} ms / "
                         f"{_fmt(res1['peaks'][m], 1)} MB" for m in modes]  # fmt: skip
                print(f"{label}: {'; '.join(parts)} ({time.time() - t0:.0f} s)", flush=True)

    print(f"\nwrote {len(rows)} rows to {path} in {time.time() - t_all:.0f} s\n")
    print(report.table(rows))
    if preset.name == "spec":
        print("\n" + report.spec_verdict(rows))
    return 0 if all(r["status"] != "error" for r in rows) else 1


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore").writerows(rows)


def _label(case: Case, impl: str) -> str:
    return f"{case.op} {impl} N={case.n} D={case.d} V={case.v} {case.dtype}"


def _case_rows(case, impl, res, meta, args, repeats, modes, rates, load) -> list[dict]:
    base = _base_row(case, impl, meta, args, repeats)
    if "error" in res:
        return [{**base, "mode": "all", "status": "error", "reason": res["error"],
                 "load1": _fmt(load)}]  # fmt: skip
    rows = []
    for mode in modes:
        ts = res["times"][mode]
        p50 = _percentile(ts, 0.5)
        flops = impls_mod.matmul_flops(case, mode, not args.frozen_weight)
        tfl = flops / (p50 * 1e-3) / 1e12 if flops else None
        plan = res.get("plan") or impls_mod.peer_plan(impl)
        ex = impls_mod.executed_flops(case, mode, not args.frozen_weight, plan)
        ex_tfl = ex / (p50 * 1e-3) / 1e12 if ex else None
        rate = rates.get(case.dtype)
        rows.append({
            **base, "mode": mode, "status": "ok", "note": res["note"],
            "p20_ms": _fmt(_percentile(ts, 0.2), 3), "p50_ms": _fmt(p50, 3),
            "p80_ms": _fmt(_percentile(ts, 0.8), 3), "peak_mb": _fmt(res["peaks"][mode], 1),
            "tflops": "" if tfl is None else f"{tfl:.4g}", "matmul_tflops": _fmt(rate, 3),
            "matmul_frac": _fmt(tfl / rate if tfl and rate else None, 3),
            "plan": plan, "exec_tflops": "" if ex_tfl is None else f"{ex_tfl:.4g}",
            "exec_frac": _fmt(ex_tfl / rate if ex_tfl and rate else None, 3),
            "repeats": len(ts), "load1": _fmt(load),
        })  # fmt: skip
    return rows


def _version() -> str:
    try:
        import fgpo_kernels

        return fgpo_kernels.__version__
    except Exception:
        return "unknown"


def _base_row(case: Case, impl: str, meta: dict, args, repeats: int) -> dict:
    return {
        "op": case.op, "impl": impl, "device": meta["device"],
        "device_name": meta["device_name"], "dtype": case.dtype, "N": case.n, "D": case.d,
        "V": case.v, "shape": case.shape, "seq": "x".join(map(str, case.seq)) if case.seq else "",
        "grad_w": int(not args.frozen_weight and case.op != "fire_mpo_step"),
        "repeats": repeats, "threads": meta["threads"],
        "preset": meta["preset"], "commit": meta["commit"], "version": meta["version"],
        "peer_version": impls_mod.peer_version(impl), "torch_version": meta["torch_version"],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "p20_ms": "", "p50_ms": "", "p80_ms": "", "peak_mb": "", "tflops": "",
        "matmul_tflops": "", "matmul_frac": "", "plan": "", "exec_tflops": "", "exec_frac": "",
        "reason": "", "note": "", "load1": "",
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
