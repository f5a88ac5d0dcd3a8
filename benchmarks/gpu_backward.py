"""Every backward path of the fused token statistics, timed side by side on the same inputs.

    python -m benchmarks.gpu_backward --out DIR          # a GPU: the design §4 shapes
    python -m benchmarks.gpu_backward --out DIR --dry-run   # CPU rehearsal, tiny shapes

Paths: ``triton_gblock`` and ``triton_atomic`` (``triton_kl.backward(mode=...)``), ``cuda``
(``cuda_kl.backward(bwd="cuda")``: the CUDA backward kernel, which ``FGPO_CUDA_BWD=cuda`` selects;
impl cuda's default backward is ``triton_gblock``'s), ``torch`` (chunked
PyTorch, few-rows shapes only: it is not a GPU path), and ``triton_held`` (``forward_with_grads``:
the forward that keeps the logits and turns them into gradients; its time includes that
forward, so compare it with forward + backward, the ``fwd`` row of the same shape). Each is
timed on the backend contract directly (no autograd, no dispatch), with the statistics computed
once by impl ``torch``'s forward; shared head (``wr`` None), two needs: ``dh`` (LoRA: frozen head
and reference) and ``dh+dW`` (trained head: dW = G^T h + Gr^T hr, both sides).

Rows are appended to DIR/backward.csv as each one is measured (a timeout keeps the earlier
ones): median / p20 / p80 milliseconds (CUDA events; wall clock on CPU), and the FLOPs of the
matmuls each path EXECUTES (recomputing the 2 logit matmuls, then dH and dW) next to the USEFUL
ones (dH, dW), each over the median time.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

from fgpo_kernels import _registry
from fgpo_kernels._backend import Needs, RowGrads

SHAPES_GPU = [(8192, 3584, 152064), (256, 3584, 152064), (1024, 3584, 152064)]
SHAPES_DRY = [(33, 48, 515)]
NEEDS = {"dh": Needs(True, False, False, False), "dh+dW": Needs(True, False, True, False)}
FIELDS = ["path", "n", "d", "v", "dtype", "need", "p20_ms", "p50_ms", "p80_ms",
          "executed_tflops", "useful_tflops", "status", "reason", "device_name"]  # fmt: skip


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    h = rnd(n, d)
    hr = (h.float() + 0.3 * rnd(n, d).float()).to(dtype)
    w = rnd(v, d) * (3 / math.sqrt(d))
    grads = RowGrads(*(torch.randn(n, generator=g).to(device) for _ in range(4)))
    return h, hr, w, grads


def _timer(fn, reps: int, device: str) -> tuple[float, float, float]:
    """(p20, p50, p80) ms of fn(i) over ``reps`` calls after one warm-up (compiles)."""
    fn(0)
    times = []
    for i in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return q(0.2), q(0.5), q(0.8)


def _paths(n: int, few_rows: bool) -> dict:
    """name -> callable(h, hr, w, stats, grads, need) for the paths that run here, or a reason."""
    out = {}
    for impl in ("triton", "cuda", "torch"):
        st = _registry.status(impl)
        if impl == "torch" and not few_rows:
            st = {"available": False, "reason": "chunked PyTorch: timed at few rows only"}
        names = ("triton_gblock", "triton_atomic", "triton_held") if impl == "triton" else (impl,)
        for name in names:
            if not st["available"]:
                out[name] = st["reason"]
                continue
            mod = _registry.module(impl)
            if name == "triton_held":
                out[name] = lambda h, hr, w, s, g, need, m=mod: m.forward_with_grads(
                    h, hr, w, None, 1.0, g, need, budget=1 << 40
                )
            elif name.startswith("triton_"):
                mode = name.split("_")[1]
                out[name] = lambda h, hr, w, s, g, need, m=mod, mode=mode: m.backward(
                    h, hr, w, None, 1.0, s, g, need, mode=mode
                )
            elif name == "cuda":  # its own kernel: its default backward is triton_gblock's
                out[name] = lambda h, hr, w, s, g, need, m=mod: m.backward(
                    h, hr, w, None, 1.0, s, g, need, bwd="cuda"
                )
            else:
                out[name] = lambda h, hr, w, s, g, need, m=mod: m.backward(
                    h, hr, w, None, 1.0, s, g, need
                )
    return out


def _row(
    base: dict,
    path: str,
    need: str,
    fn,
    reps: int,
    device: str,
    executed: float,
    useful: float | None,
) -> dict:
    """One measured row: ``fn(i)`` timed, or the error it raised (e.g. out of memory)."""
    row = {**base, "path": path, "need": need}
    try:
        p20, p50, p80 = _timer(fn, reps, device)
    except Exception as exc:  # report it and go on
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, executed_tflops=executed / p50 / 1e9,
               status="ok")  # fmt: skip
    if useful is not None:
        row["useful_tflops"] = useful / p50 / 1e9
    return row


def _shape_rows(n: int, d: int, v: int, dtype, device: str, reps: int, base: dict):
    """Yield the rows of one shape: the forward, then every path x need."""
    sets = [_inputs(n, d, v, dtype, device, seed) for seed in range(2)]
    stats = [_registry.module("torch").forward(h, hr, w, None, 1.0) for h, hr, w, _ in sets]
    mm = 2 * n * d * v  # one logit-sized matmul
    paths = _paths(n, few_rows=n <= 1024)
    # The forward alone, so triton_held (forward + gradients) has its comparison.
    fwd_impl = "torch" if isinstance(paths["triton_gblock"], str) else "triton"
    fwd = _registry.module(fwd_impl)
    yield _row(base, f"fwd ({fwd_impl})", "", lambda i: fwd.forward(*sets[i % 2][:3], None, 1.0),
               reps, device, 2 * mm, None)  # fmt: skip
    for need_name, need in NEEDS.items():
        # dH, and with a trained shared head dW = G^T h + Gr^T hr (both sides); every path
        # also executes the 2 logit matmuls (recomputed, or held's own forward)
        useful = mm * (3 if need.w else 1)
        for name, fn in paths.items():
            if isinstance(fn, str):
                yield {**base, "path": name, "need": need_name, "status": "skipped", "reason": fn}
                continue
            run = lambda i, fn=fn, need=need: fn(*sets[i % 2][:3], stats[i % 2], sets[i % 2][3],
                                                 need)  # fmt: skip
            yield _row(base, name, need_name, run, reps, device, useful + 2 * mm, useful)


def run(out_dir: Path, dry: bool, reps: int) -> list[dict]:
    """Measure every shape, appending each row to out_dir/backward.csv as it is measured."""
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    name = "cpu" if dry else torch.cuda.get_device_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out_dir / "backward.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, FIELDS)
        wr.writeheader()
        for n, d, v in SHAPES_DRY if dry else SHAPES_GPU:
            base = {"n": n, "d": d, "v": v, "dtype": str(dtype)[6:], "device_name": name}
            for r in _shape_rows(n, d, v, dtype, device, reps, base):
                rows.append(r)
                wr.writerow(r)
                f.flush()
                ms = f"{r['p50_ms']:9.2f} ms" if r["status"] == "ok" else r["status"]
                print(f"{r['path']:14s} {r['need']:6s} N={n:5d} D={d} V={v}: {ms} "
                      f"{r.get('reason', '')}", flush=True)  # fmt: skip
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for backward.csv")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CI rehearsal)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls (default 3: the session gives this 50 s)",
    )
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    run(Path(args.out), args.dry_run, args.repeats or 3)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
