"""Peak GPU memory of a FiRe-MPO training step at real size, simulated on a CPU.

SIMULATED WITH FAKE TENSORS, NOT MEASURED ON A GPU. Each configuration runs one training step
of ``fgpo.train.Trainer`` (load, LoRA, forward, loss, backward, AdamW: the code ``fgpo train``
runs) on meta tensors built from a model's real config, and PyTorch's ``MemTracker`` reports
the peak by category (``benchmarks/memsim/``). Two ways side by side: ``ours`` (backbone hidden
states, ``FiReMPOLoss`` with impl torch / triton / cuda, whose fake host code allocates the
kernels' real workspaces) and ``materialized`` (the same trainer keeping full-vocabulary fp32
logits of every position of all eight passes, as the method's reference implementation does).

    python -m benchmarks.memory_model                         # the committed sweep
    python -m benchmarks.memory_model --models qwen3-vl-4b --micro-batch 8 --ways materialized
    python -m benchmarks.memory_model --model-config path/to/config.json --micro-batch 4

Every configuration runs in a fresh process; rows are appended to ``OUT/simulated_memory.csv``
(a configuration already there is skipped, so an interrupted sweep resumes), then the table
(``OUT/simulated_memory.md``) and the plot are rewritten from the whole CSV.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "model_configs"
MODELS = {  # bundled configs (benchmarks/model_configs/README.md says where each comes from)
    "qwen2.5-vl-7b": CONFIGS / "qwen2.5-vl-7b-instruct.json",
    "qwen2.5-vl-3b": CONFIGS / "qwen2.5-vl-3b-instruct.json",
    "qwen3-vl-4b": CONFIGS / "qwen3-vl-4b-instruct.json",
    "llava-1.5-7b": CONFIGS / "llava-1.5-7b.json",
}
LABEL = "simulated with fake tensors, not measured on a GPU"
CATEGORIES = ("params", "buffers", "grads", "activations", "temporaries", "optimizer", "other")
MARK = "@@MEMSIM@@ "
GIB = 2**30
# What the tracker cannot see: tensors are all it counts. On an H100/H200 the process also
# holds the CUDA context (driver, kernel images; ~0.5 GiB with lazy module loading), cuBLAS /
# cuBLASLt workspaces (tens of MiB), and the caching allocator keeps freed blocks reserved:
# nvidia-smi shows reserved memory plus the context. The validation adds these as stated.
CONTEXT_GIB = 0.5
PUBLISHED = {  # the only published figure: FiRe-MPO recipe on an H200 (thesis/EXPERIMENTS.md)
    "model": "qwen3-vl-4b", "micro_batch": 8, "checkpointing": True, "way": "materialized",
    "peak_gb": 139.0, "card_gb": 143.0, "without_checkpointing": "out of memory",
}  # fmt: skip
FIELDS = [
    "model", "config", "params_b", "micro_batch", "accumulation", "checkpointing", "way",
    "impl", "options", "image_size", "max_pixels", "seq_len", "image_tokens", "sequences",
    "weighted_rows",
    "simulated_peak_gib", *(f"simulated_{c}_gib" for c in CATEGORIES), "gpu_sms", "status",
    "reason", "assumptions", "sim_s", "note",
]  # fmt: skip


def _key(row: dict) -> tuple:
    keys = ("config", "micro_batch", "checkpointing", "way", "impl", "options", "image_size",
            "max_pixels")  # fmt: skip
    return tuple(str(row[k]) for k in keys)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate one configuration in this process; the CSV row."""
    import torch

    from benchmarks.memsim.step import SequenceSpec, SimSpec, simulate

    torch.set_num_threads(1)
    seq = SequenceSpec(
        image_size=args.image_size, max_pixels=args.max_pixels, prompt_tokens=args.prompt_tokens,
        response_tokens=args.response_tokens, span_tokens=args.span_tokens,
    )  # fmt: skip
    opts = json.loads(args.options_json)
    spec = SimSpec(
        args.config, micro_batch=args.one_batch, checkpointing=args.one_ckpt == "on",
        way=args.one_way, impl=None if args.one_impl == "-" else args.one_impl, options=opts,
        seq=seq, sm_count=args.gpu_sms,
    )  # fmt: skip
    r = simulate(spec)
    row = {
        "model": args.name, "config": os.path.relpath(args.config, ROOT), "micro_batch":
        args.one_batch, "checkpointing": args.one_ckpt, "way": args.one_way,
        "impl": args.one_impl, "options": args.options_json, "gpu_sms": args.gpu_sms,
        "params_b": round(r["params"] / 1e9, 3), "status": "ok", "reason": "", "note": LABEL,
        "image_size": args.image_size, "max_pixels": args.max_pixels,
    }  # fmt: skip
    for k in ("accumulation", "seq_len", "image_tokens", "sequences", "weighted_rows", "sim_s"):
        row[k] = r[k]
    row["simulated_peak_gib"] = round(r["peak"]["total"] / GIB, 6)
    for c in CATEGORIES:
        row[f"simulated_{c}_gib"] = round(r["peak"][c] / GIB, 6)
    row["assumptions"] = "; ".join(f"{k} x{v}" for k, v in sorted(r["assumed"].items()))
    return row


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations of the sweep, in order."""
    configs = [(n, str(MODELS[n])) for n in args.models]
    configs += [(Path(p).stem, str(Path(p).resolve())) for p in args.model_config]
    option_grid = [dict(zip(args.option_names, vals)) for vals in
                   itertools.product(*args.option_values)] or [{}]  # fmt: skip
    out = []
    for (name, cfg), b, ckpt, way, opts in itertools.product(
        configs, args.micro_batch, args.checkpointing, args.ways, option_grid
    ):
        if way == "materialized" and opts.get("shared_prefix"):
            continue  # the straightforward way runs every sequence on its own
        impls = args.impls if way == "ours" else ["-"]
        for impl in impls:
            out.append(dict(name=name, config=cfg, micro_batch=b, checkpointing=ckpt, way=way,
                            impl=impl, options=json.dumps(opts, sort_keys=True)))  # fmt: skip
    return out


def _sweep_options(names: list[str], given: list[str]) -> tuple[list[str], list[list[Any]]]:
    """``--option key=v1,v2`` values, plus ``shared_prefix`` both ways when the trainer has it."""
    from fgpo.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    opts: dict[str, list[Any]] = {}
    for item in given:
        key, sep, vals = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--option {item!r}: expected FIELD=v1,v2 with a TrainConfig field")
        opts[key] = [json.loads(v) if v in ("true", "false") else v for v in vals.split(",")]
    if "shared_prefix" in fields and "shared_prefix" not in opts:
        opts["shared_prefix"] = [False, True]
    return list(opts), list(opts.values())


def _existing(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {_key(r): r for r in csv.DictReader(f) if r.get("status") == "ok"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        "--model-config",
        nargs="*",
        default=[],
        metavar="CONFIG_JSON",
        help="your own model's config.json (a Hub vision-language model)",
    )
    p.add_argument("--micro-batch", nargs="*", type=int, default=[1, 4, 8])
    p.add_argument("--checkpointing", nargs="*", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--ways", nargs="*", default=["ours", "materialized"], choices=["ours",
                   "materialized"])  # fmt: skip
    p.add_argument("--impls", nargs="*", default=["triton"], choices=["torch", "triton", "cuda"])
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FIELD=v1,v2",
        help="sweep a TrainConfig field (shared_prefix is swept when it exists)",
    )
    p.add_argument("--gpu-sms", type=int, default=132, help="SMs of the GPU (H100/H200: 132)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--max-pixels", type=int, default=512 * 28 * 28)
    p.add_argument("--prompt-tokens", type=int, default=30)
    p.add_argument("--response-tokens", type=int, default=20)
    p.add_argument("--span-tokens", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "simulated"))
    p.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    p.add_argument("--report-only", action="store_true", help="redraw table and plot only")
    p.add_argument("--readme", default=None, help="also rewrite this README's memsim block")
    for name in ("config", "name", "one-batch", "one-ckpt", "one-way", "one-impl"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--options-json", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config:  # a worker: one configuration
        args.one_batch = int(args.one_batch)
        print(MARK + json.dumps(run_one(args)), flush=True)
        return 0
    for path in args.model_config:
        from benchmarks.memsim.step import load_model_config

        load_model_config(path)  # a bad file fails here, naming it, before any run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "simulated_memory.csv"
    if not args.report_only:
        args.option_names, args.option_values = _sweep_options([], args.option)
        done = _existing(csv_path)
        todo = plan(args)
        print(f"{len(todo)} configurations ({LABEL}); results: {csv_path}", flush=True)
        for k, job in enumerate(todo, 1):
            key = _key(
                {
                    **job,
                    "config": os.path.relpath(job["config"], ROOT),
                    "image_size": args.image_size,
                    "max_pixels": args.max_pixels,
                }
            )
            if key in done:
                continue
            row = _run_worker(args, job)
            _append(csv_path, row)
            print(f"[{k}/{len(todo)}] {_line(row)}", flush=True)
    from benchmarks.memsim.report import write_report

    write_report(csv_path, out, Path(args.readme) if args.readme else None)
    return 0


def _run_worker(args: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory_model", "--config", job["config"],
           "--name", job["name"], "--one-batch", str(job["micro_batch"]), "--one-ckpt",
           job["checkpointing"], "--one-way", job["way"], "--one-impl", job["impl"],
           "--options-json", job["options"], "--gpu-sms", str(args.gpu_sms)]  # fmt: skip
    for k in ("image_size", "max_pixels", "prompt_tokens", "response_tokens", "span_tokens"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base = {**job, "config": os.path.relpath(job["config"], ROOT), "model": job["name"],
            "note": LABEL, "gpu_sms": args.gpu_sms, "image_size": args.image_size,
            "max_pixels": args.max_pixels}  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              cwd=ROOT, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "reason": f"timeout after {args.timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**base, "status": "error", "reason": tail[0][:300]}
    return json.loads(lines[0][len(MARK) :])


def _append(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _line(row: dict[str, Any]) -> str:
    what = (f"{row['model']} B={row['micro_batch']} ckpt={row['checkpointing']} "
            f"{row['way']}/{row['impl']} {row['options']}")  # fmt: skip
    if row.get("status") != "ok":
        return f"{what}: {row.get('status')} {row.get('reason')}"
    return f"{what}: {row['simulated_peak_gib']} GiB (simulated) in {row['sim_s']} s"


if __name__ == "__main__":
    raise SystemExit(main())
