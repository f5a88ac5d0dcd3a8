"""Tables from the runner's CSV: ``python -m benchmarks.report DIR [--mode full] [--op ...]``.

One markdown row per (case, impl): p50 time, peak memory, achieved TFLOP/s and its fraction of
the device's measured matmul rate (docs/design.md §4), and time and memory relative to the
materialized path on the same case. Skipped and failed rows are listed after the table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def _f(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ratio(a, b) -> str:
    a, b = _f(a), _f(b)
    return f"{a / b:.2f}" if a is not None and b else ""


def _case_key(r: dict) -> tuple:
    return (r["op"], r["device"], r["dtype"], r["N"], r["D"], r["V"], r.get("shape", ""),
            r.get("seq", ""))  # fmt: skip


def table(rows: list[dict], mode: str = "full", ops=None, skipped: bool = True) -> str:
    """Markdown table of one mode (latest row per case and impl)."""
    ok: dict[tuple, dict] = {}
    for r in rows:
        if r["status"] == "ok" and r["mode"] == mode and (not ops or r["op"] in ops):
            ok[(*_case_key(r), r["impl"])] = r
    lines = [
        f"| op | shape | N | D | V | dtype | impl | {mode} p50 ms | peak MB | useful TFLOP/s "
        "| of matmul | plan | executed TFLOP/s | of matmul | time / mat. | mem / mat. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {_case_key(r): r for r in ok.values() if r["impl"] == "materialized"}
    for r in ok.values():
        m = ref.get(_case_key(r))
        tr = mr = ""
        if m is not None and r["impl"] != "materialized":
            tr, mr = _ratio(r["p50_ms"], m["p50_ms"]), _ratio(r["peak_mb"], m["peak_mb"])
        frac, ex = _f(r.get("matmul_frac")), _f(r.get("exec_frac"))
        lines.append(
            f"| {r['op']} | {r.get('shape', '')} | {r['N']} | {r['D']} | {r['V']} | {r['dtype']} "
            f"| {r['impl']} | {r['p50_ms']} | {r['peak_mb']} | {r.get('tflops', '')} "
            f"| {_pct(frac)} | {r.get('plan', '')} | {r.get('exec_tflops', '')} | {_pct(ex)} "
            f"| {tr} | {mr} |"
        )
    if len(lines) == 2:
        lines = [f"(no '{mode}' rows)"]
    if skipped:
        seen = set()
        for r in rows:
            if r["status"] in ("skipped", "error") and (not ops or r["op"] in ops):
                k = (r["op"], r["impl"], r["status"], r.get("reason", ""))
                if k not in seen:
                    seen.add(k)
                    lines.append(f"- {r['op']} / {r['impl']}: {r['status']}: {r.get('reason')}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


# docs/design.md §4.4: the GPU shape and the share of the measured matmul rate.
GPU_SPEC = ("token_kl", "8192", "3584", "152064", "bfloat16")
MATMUL_TARGET = 0.70


def gpu_verdict(rows: list[dict]) -> str:
    """design §4.4 matmul-rate target at the GPU shape, judged twice per impl of ours: on the
    forward (useful FLOPs: the logit matmuls; a "held" forward also does the backward's work,
    so it is judged on executed FLOPs) and on forward + backward with recomputation credited
    (executed FLOPs of the plan the op took / the measured torch.mm rate)."""
    pick = {}
    for r in rows:
        key = tuple(str(r[k]) for k in ("op", "N", "D", "V", "dtype"))
        if key == GPU_SPEC and r["status"] == "ok" and r["impl"] in ("torch", "triton", "cuda"):
            pick[(r["impl"], r["mode"])] = r
    lines = []
    for impl in ("triton", "cuda", "torch"):
        fwd, full = pick.get((impl, "forward")), pick.get((impl, "full"))
        if fwd is None and full is None:
            continue
        parts = [f"{impl}:"]
        if fwd is not None:
            held = fwd.get("plan") == "held"
            frac = _f(fwd.get("exec_frac" if held else "matmul_frac"))
            what = "executed" if held else "useful"
            ok = frac is not None and frac >= MATMUL_TARGET
            parts.append(f"forward {_pct(frac)} of matmul ({what}; {'PASS' if ok else 'FAIL'})")
        if full is not None:
            frac = _f(full.get("exec_frac"))
            ok = frac is not None and frac >= MATMUL_TARGET
            parts.append(f"fwd+bwd {_pct(frac)} executed, plan {full.get('plan') or '?'} "
                         f"({'PASS' if ok else 'FAIL'})")  # fmt: skip
        lines.append(" ".join(parts))
    if not lines:
        return "design §4.4 GPU check: needs ok rows of ours at token_kl N=8192 D=3584 bf16"
    return f"design §4.4 GPU check (>= {_pct(MATMUL_TARGET)} of torch.mm):\n- " + "\n- ".join(lines)


def spec_verdict(rows: list[dict]) -> str:
    """docs/design.md §4 (CPU): token_kl fwd+bwd at N=4096, D=512, V=32000, fp32, impl torch:
    peak extra memory <= 10% of the materialized path's, time <= the materialized path's."""
    pick = {}
    for r in rows:
        key = tuple(str(r[k]) for k in ("op", "N", "D", "V", "dtype", "mode", "status", "device"))
        if key == ("token_kl", "4096", "512", "32000", "float32", "full", "ok", "cpu"):
            pick[r["impl"]] = r
    if "torch" not in pick or "materialized" not in pick:
        return "design §4 CPU check: needs ok 'full' rows of torch and materialized (preset spec)"
    t, m = pick["torch"], pick["materialized"]
    tr = _f(t["p50_ms"]) / _f(m["p50_ms"])
    mr = _f(t["peak_mb"]) / _f(m["peak_mb"])
    ok_t, ok_m = tr <= 1.0, mr <= 0.10
    return (
        f"design §4 CPU check (token_kl fwd+bwd, N=4096 D=512 V=32000 fp32): torch "
        f"{t['p50_ms']} ms / {t['peak_mb']} MB vs materialized {m['p50_ms']} ms / "
        f"{m['peak_mb']} MB -> time x{tr:.2f} ({'PASS' if ok_t else 'FAIL'}: <= 1), "
        f"memory x{mr:.3f} ({'PASS' if ok_m else 'FAIL'}: <= 0.10)"
    )


def read(dir_or_file: Path) -> list[dict]:
    paths = [dir_or_file] if dir_or_file.is_file() else sorted(dir_or_file.glob("*.csv"))
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    ap.add_argument("path", help="a results directory or CSV file")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--op", nargs="+", default=None)
    ap.add_argument("--no-skipped", action="store_true")
    args = ap.parse_args(argv)
    rows = read(Path(args.path))
    if not rows:
        print(f"no rows in {args.path}", file=sys.stderr)
        return 1
    print(table(rows, args.mode, args.op, skipped=not args.no_skipped))
    if any((r["N"], r["D"], r["V"]) == ("4096", "512", "32000") for r in rows):
        print("\n" + spec_verdict(rows))
    if any(tuple(str(r[k]) for k in ("op", "N", "D", "V", "dtype")) == GPU_SPEC for r in rows):
        print("\n" + gpu_verdict(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
