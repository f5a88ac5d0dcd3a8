"""The shipped sm_90 tiles of the Triton forward and G kernel against the tiles that overlap the
epilogue with a second program per SM (and the flattened loops against their unflattened
twins), timed side by side next to their PREDICTED times.

    python -m benchmarks.gpu_tiles --out DIR          # a GPU: the design §4 shapes
    python -m benchmarks.gpu_tiles --out DIR --dry-run   # CPU rehearsal, tiny shapes

Why: one 128 x 128 program per SM (``GPU_CONFIGS["fwd"]`` / ``["g"]``, wgmma m64n128k16) leaves
the exp/log epilogue of each vocabulary tile unoverlapped; 64 x 128 tiles with 4 warps fit two
programs per SM, so one program's epilogue runs under the other's matmuls, at the price of
half the hidden-state rows per weight tile (more shared-memory and L2 traffic per FLOP).
``benchmarks.gpu_model`` PREDICTS a wash (-1.4% / +7.7% forward, -1.8% / +4.5% G kernel's
backward, shared / separate weight, at N=8192) and does not charge L2-to-SM bandwidth, so only
a GPU can decide; the first GPU session
runs this (``gpu_session.sh``, phase ``tiles``). ``tests/test_triton_aot.py`` compiles every
entry of ``ALTERNATIVES`` for sm_90 with triton 3.7.1 and 3.6.0 and holds it to the shipped
entries' checks (no spills, m64n128k16, the loop nest, 2 programs per SM). The forwards run one
flattened (vocabulary tile, D slice) loop (``KernelConfig.flatten``: the next tile's copies in
flight during an epilogue); the shipped one's unflattened twin is timed too, since the model
charges neither the pipeline's refill per tile nor its removal (tiles "...-nested"). So is the
shipped G kernel (several tiles per program, flattened) against one tile per program, as it
ran before ("...-1tile").

Rows are appended to DIR/tiles.csv as each one is measured: kernel, tiles, case, median / p20 /
p80 ms (CUDA events; wall clock on CPU), the model's prediction for those tiles (H200
datasheet; ``--tflops`` rescales nothing here: compare the ratios), and the status. On a GPU,
each case ends with the choice FGPO_TRITON_TUNE=1 makes on the same inputs (tiles "tuned: ...",
``triton_kl/tune.py``), which should agree with the side-by-side rows above it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

from benchmarks import gpu_model
from benchmarks.gpu_backward import _inputs, _timer
from benchmarks.impls import env_switch
from fgpo_kernels import _registry
from fgpo_kernels._backend import Needs
from fgpo_kernels.triton_kl import configs

# Candidate tiles per shipped entry: (block_n, block_v, block_d, warps, stages, programs per SM).
# The 2-per-SM tiles are the ones FGPO_TRITON_TUNE=1 may pick (``configs.TUNE_CANDIDATES``).
ALTERNATIVES = {
    "fwd": [
        *configs.TUNE_CANDIDATES["fwd"],
        configs.GPU_CONFIGS["fwd"]._replace(flatten=False),
    ],
    "g": [
        *configs.TUNE_CANDIDATES["g"],
        configs.GPU_CONFIGS["g"]._replace(flatten=False),
    ],
}
CASES_GPU = [(8192, True), (8192, False), (1024, True)]  # (N, shared weight); D, V of design §4
D_GPU, V_GPU = 3584, 152064
CASES_DRY = [(33, True), (33, False)]
D_DRY, V_DRY = 48, 515
FIELDS = ["kernel", "tiles", "per_sm", "n", "d", "v", "weight", "p20_ms", "p50_ms", "p80_ms",
          "predicted_ms", "status", "reason", "device_name"]  # fmt: skip


def _predicted(kernel: str, cfg: configs.KernelConfig, n: int, d: int, v: int,
               shared: bool) -> float:  # fmt: skip
    """PREDICTED ms of ``kernel`` with tiles ``cfg`` at (n, d, v) in bf16 (H200 datasheet)."""
    case = gpu_model.Case(n, d, v, shared, False)
    fn = gpu_model.triton_forward if kernel == "fwd" else gpu_model.gblock_backward
    return fn(case, gpu_model.DEVICES["H200-SXM"], config=cfg).seconds * 1e3


def _call(kernel: str, cfg, h, hr, w, wr, stats, grads):
    from fgpo_kernels.triton_kl import bwd_gblock, fwd

    if kernel == "fwd":
        return fwd.forward(h, hr, w, wr, 1.0, config=cfg)
    return bwd_gblock.backward_gblock(h, hr, w, wr, 1.0, stats, grads,
                                      Needs(True, False, False, False), config=cfg)  # fmt: skip


def _case_rows(n: int, shared: bool, d: int, v: int, dtype, device: str, reps: int,
               base: dict):  # fmt: skip
    """Yield the rows of one case: every kernel x tiles on the same two input sets."""
    from fgpo_kernels.triton_kl import fwd

    sets = []
    for seed in range(2):
        h, hr, w, grads = _inputs(n, d, v, dtype, device, seed)
        wr = None if shared else (w.float() * 0.9).to(dtype)
        sets.append((h, hr, w, wr, fwd.forward(h, hr, w, wr, 1.0), grads))
    for kernel in ("fwd", "g"):
        for cfg in [configs.GPU_CONFIGS[kernel], *ALTERNATIVES[kernel]]:
            row = {**base, "kernel": kernel, "per_sm": cfg.per_sm, "n": n,
                   "tiles": f"{cfg.block_n}x{cfg.block_v}x{cfg.block_d}/{cfg.num_warps}w"
                            + ("-flat" if cfg.flatten else "-nested" if kernel == "fwd" else
                               "-1tile"),
                   "weight": "shared" if shared else "separate",
                   "predicted_ms": _predicted(kernel, cfg, n, d, v, shared)}  # fmt: skip
            try:
                run = lambda i, k=kernel, c=cfg: _call(k, c, *sets[i % 2])
                p20, p50, p80 = _timer(run, reps, device)
                row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, status="ok")
            except Exception as exc:  # report it and go on
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
            yield row
    if device == "cuda":
        yield from _tuned_rows(sets[0], n, shared, base)


def _tuned_rows(inputs, n: int, shared: bool, base: dict):
    """What FGPO_TRITON_TUNE=1 picks on these inputs (``triton_kl/tune.py``): one row per
    kernel, its tiles "tuned: ...", p50 the chosen tiles' median, reason every tiles' median
    and any dropped candidate."""
    from fgpo_kernels.triton_kl import tune

    with env_switch({tune.ENV: "1"}):
        tune.clear()
        try:
            for kernel in ("fwd", "g"):
                row = {**base, "kernel": kernel, "per_sm": "", "n": n, "tiles": "tuned",
                       "weight": "shared" if shared else "separate",
                       "predicted_ms": float("nan")}  # fmt: skip
                try:
                    _call(kernel, None, *inputs)
                    (c,) = [c for c in tune.choices() if c["entry"] == kernel]
                    times = "; ".join(f"{k} {v:.3f} ms" for k, v in c["ms"].items())
                    dropped = "; ".join(f"{k} dropped: {v}" for k, v in c["dropped"].items())
                    reason = "; ".join(x for x in (times, dropped) if x)
                    row.update(tiles=f"tuned: {c['chosen']}", p50_ms=c["ms"][c["chosen"]],
                               status="ok", reason=reason)  # fmt: skip
                except Exception as exc:  # report it and go on
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
                yield row
        finally:
            tune.clear()


def run(out_dir: Path, dry: bool, reps: int) -> list[dict]:
    """Time every kernel x tiles x case, appending each row to out_dir/tiles.csv."""
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    d, v = (D_DRY, V_DRY) if dry else (D_GPU, V_GPU)
    base = {"d": d, "v": v, "device_name": "cpu" if dry else torch.cuda.get_device_name()}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out_dir / "tiles.csv").open("w", newline="") as f:
        out = csv.DictWriter(f, FIELDS)
        out.writeheader()
        for n, shared in CASES_DRY if dry else CASES_GPU:
            for row in _case_rows(n, shared, d, v, dtype, device, reps, base):
                rows.append(row)
                out.writerow(row)
                f.flush()
                ms = f"{row['p50_ms']:8.2f} ms" if row["status"] == "ok" else row["status"]
                print(f"{row['kernel']:4s} {row['tiles']:23s} x{row['per_sm']} N={n:5d} "
                      f"{row['weight']:8s} {ms} (PREDICTED {row['predicted_ms']:.2f} ms) "
                      f"{row.get('reason', '')}", flush=True)  # fmt: skip
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for tiles.csv")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CI rehearsal)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    triton = _registry.status("triton")  # triton's alone: _C's self-test ran in phase status
    if not triton["available"]:  # e.g. triton 3.6's CPU interpreter under numpy 2
        print(f"skipped: impl triton is unavailable: {triton['reason']}")
        return 0
    run(Path(args.out), args.dry_run, args.repeats)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
