"""Draw the runner's CSV rows as PNG charts: time and peak memory against N and against V.

    python -m benchmarks.plot DIR [--modes full forward] [--out DIR]

Reads every ``*.csv`` in DIR (rows with ``status=ok``; for a repeated point the latest row
wins) and writes, per (op, device, dtype, mode) and per sweep (N at fixed D and V, or V at
fixed N and D), one PNG with two panels (p50 time with the p20-p80 band, and peak memory),
one line per impl, log-log axes. ``fire_mpo_step`` rows become a bar chart per shape.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

STYLE = {  # impl -> (color, marker); ours solid, others dashed
    "torch": ("tab:blue", "o"),
    "triton": ("tab:cyan", "s"),
    "cuda": ("tab:purple", "D"),
    "materialized": ("black", "x"),
    "liger_jsd_b0": ("tab:orange", "^"),
    "liger_jsd_b1": ("tab:red", "v"),
    "liger_flce": ("tab:orange", "^"),
    "cce": ("tab:green", "P"),
    "torch_lce": ("tab:brown", "*"),
    "torch_recompute": ("tab:gray", "o"),
    "triton_recompute": ("tab:gray", "s"),
    "matmul_floor": ("black", "_"),
}
OURS = ("torch", "triton", "cuda")
# Legend names: ours say "ours", so our chunked PyTorch impl ("torch") is never mistaken for
# PyTorch's own linear_cross_entropy peer ("torch_lce").
LABELS = {
    "torch": "ours: chunked PyTorch (impl torch)",
    "triton": "ours: Triton (impl triton)",
    "cuda": "ours: CUDA C++ (impl cuda)",
    "materialized": "materialized logits (plain PyTorch)",
    "liger_jsd_b0": "Liger-Kernel fused JSD, beta=0",
    "liger_jsd_b1": "Liger-Kernel fused JSD, beta=1",
    "liger_flce": "Liger-Kernel fused linear CE",
    "cce": "Cut Cross-Entropy",
    "torch_lce": "PyTorch linear_cross_entropy (peer)",
    "torch_recompute": "ours: chunked PyTorch, logits recomputed in the backward",
    "triton_recompute": "ours: Triton, logits recomputed in the backward",
    "matmul_floor": "matmul floor (the op's matmuls only)",
}


def label(impl: str) -> str:
    return LABELS.get(impl, impl)


def load(dir_: Path) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for path in sorted(dir_.glob("*.csv")):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("status") != "ok" or not r.get("p50_ms"):
                    continue
                key = (r["op"], r["impl"], r["device"], r["dtype"], r["N"], r["D"], r["V"],
                       r["mode"], r.get("shape", ""), r.get("seq", ""))  # fmt: skip
                if key not in rows or r.get("timestamp", "") >= rows[key].get("timestamp", ""):
                    rows[key] = r
    return list(rows.values())


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def sweeps(rows: list[dict]):
    """Yield (title_suffix, x_name, {impl: [(x, row)]}) for every sweep with >= 2 points."""
    by = defaultdict(list)
    for r in rows:
        if r["op"] == "fire_mpo_step":
            continue
        by[(r["op"], r["device"], r["dtype"], r["mode"])].append(r)
    for (op, device, dtype, mode), rs in sorted(by.items()):
        for x_name, fixed in (("N", ("D", "V")), ("V", ("N", "D"))):
            groups = defaultdict(list)
            for r in rs:
                groups[tuple(r[k] for k in fixed)].append(r)
            for fix, grs in sorted(groups.items()):
                xs = {r[x_name] for r in grs}
                if len(xs) < 2:
                    continue
                latest: dict[tuple, dict] = {}  # one point per (impl, x): the latest run
                for r in grs:
                    k = (r["impl"], int(r[x_name]))
                    if k not in latest or r.get("timestamp", "") >= latest[k].get("timestamp", ""):
                        latest[k] = r
                lines = defaultdict(list)
                for (impl, x), r in latest.items():
                    lines[impl].append((x, r))
                desc = ", ".join(f"{k}={v}" for k, v in zip(fixed, fix))
                yield (op, device, dtype, mode, x_name, desc, fix), lines


def _impl_order(impls):
    order = list(STYLE)
    return sorted(impls, key=lambda i: order.index(i) if i in order else len(order))


def plot_sweep(key, lines, out_dir: Path, plt) -> Path:
    op, device, dtype, mode, x_name, desc, fix = key
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    any_row = next(iter(lines.values()))[0][1]
    for impl in _impl_order(lines):
        pts = sorted(lines[impl], key=lambda p: p[0])
        color, marker = STYLE.get(impl, ("gray", "."))
        ls = "-" if impl in OURS else "--"
        x = [p[0] for p in pts]
        t50 = [_num(p[1]["p50_ms"]) for p in pts]
        t20 = [_num(p[1]["p20_ms"]) or t for p, t in zip(pts, t50)]
        t80 = [_num(p[1]["p80_ms"]) or t for p, t in zip(pts, t50)]
        ax_t.plot(x, t50, ls, color=color, marker=marker, label=label(impl))
        ax_t.fill_between(x, t20, t80, color=color, alpha=0.15)
        mem = [(xx, _num(p[1]["peak_mb"])) for xx, p in zip(x, pts)]
        mem = [(xx, m) for xx, m in mem if m is not None]
        if mem:
            ax_m.plot([m[0] for m in mem], [max(m[1], 0.1) for m in mem], ls, color=color,
                      marker=marker, label=label(impl))  # fmt: skip
    xs_all = sorted({p[0] for pts in lines.values() for p in pts})
    for ax, ylab in ((ax_t, f"{mode} time, p50 (ms)"), (ax_m, "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(x_name)
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(
        f"{op} ({mode}) vs {x_name}, {desc}, {dtype} on {any_row.get('device_name') or device}"
        f"\ncommit {any_row.get('commit', '?')}, torch {any_row.get('torch_version', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    name = f"{op}_{device}_{dtype}_{mode}_vs{x_name}_" + "_".join(
        f"{k}{v}" for k, v in zip(("D", "V") if x_name == "N" else ("N", "D"), fix)
    )
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(rows: list[dict], out_dir: Path, plt) -> list[Path]:
    paths = []
    by = defaultdict(list)
    for r in rows:
        if r["op"] == "fire_mpo_step" and r["mode"] == "full":
            by[(r["device"], r["dtype"], r["shape"], r["seq"], r["D"], r["V"])].append(r)
    for (device, dtype, shape, seq, d, v), rs in sorted(by.items()):
        rs = [r for i in _impl_order({r["impl"] for r in rs}) for r in rs if r["impl"] == i]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
        names = [r["impl"] for r in rs]
        colors = [STYLE.get(n, ("gray", "."))[0] for n in names]
        ticks = [label(n).replace(" (", "\n(") for n in names]
        ax_t.bar(ticks, [_num(r["p50_ms"]) for r in rs], color=colors)
        ax_m.bar(ticks, [_num(r["peak_mb"]) or 0 for r in rs], color=colors)
        ax_t.set_ylabel("loss fwd+bwd, p50 (ms)")
        ax_m.set_ylabel("peak extra memory (MB)")
        b, seq_len, resp, span = seq.split("x")
        fig.suptitle(
            f"one FiRe-MPO step, {shape}: D={d}, V={v}, B={b}, L={seq_len}, "
            f"response {resp}, span {span}, 8 passes\n{dtype} on {rs[0].get('device_name')}",
            fontsize=9,
        )
        fig.tight_layout()
        tag = shape.replace(":", "_").replace("/", "_") + f"_B{b}_L{seq_len}"
        path = out_dir / f"fire_mpo_step_{device}_{dtype}_{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    ap.add_argument("dir", help="directory holding the runner's CSV files")
    ap.add_argument("--out", default=None, help="where to write PNGs (default: DIR)")
    ap.add_argument("--modes", nargs="+", default=["full"], help="modes to draw (default full)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = Path(args.dir)
    out = Path(args.out) if args.out else src
    out.mkdir(parents=True, exist_ok=True)
    rows = load(src)
    if not rows:
        print(f"no rows with status=ok in {src}/*.csv", file=sys.stderr)
        return 1
    paths = []
    for key, lines in sweeps(rows):
        if key[3] in args.modes:
            paths.append(plot_sweep(key, lines, out, plt))
    paths += plot_e2e(rows, out, plt)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
