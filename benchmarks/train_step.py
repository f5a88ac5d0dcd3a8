"""One FiRe-MPO training step, plain forward vs shared prefix: time and peak memory, one run.

    python -m benchmarks.train_step --config bench_prefix             # minutes on 2 CPU cores
    python -m benchmarks.train_step --out benchmarks/results/cpu/train_step_prefix.csv

Both modes are ``fgpo.train.Trainer`` on copies of the same tiny model (``extra.tiny`` of the
config, through ``fgpo.models.tiny.build_tiny``) and the same generated micro-batch
(``extra.data``: every example has v', so all four sequences run), differing only in
``shared_prefix``. In one process:

1. warm-up steps of each mode, then ``--steps`` steps of each, interleaved (plain, shared,
   shared, plain, ...) so load from other jobs falls on both alike; p20 / p50 / p80 of each;
2. peak memory of one more step per mode above what is held just before it: CUDA
   ``max_memory_allocated`` minus ``memory_allocated``; CPU the peak resident set (``VmHWM``,
   reset through ``/proc/self/clear_refs``) minus the resident set, with glibc told to return
   every block >= 64 KiB at once (the ``benchmarks.run`` helpers), so the other mode's freed
   memory cannot be reused unseen.

Each CSV row (one per mode, appended) carries the token counts, the measured times and
memory, and the COMPUTED matmul FLOPs of the step (``benchmarks.prefix_flops``: what the
token counts predict) with their ratio, plus the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .prefix_flops import LMDims, VisionDims, step_flops
from .run import _device_name, _git_commit, _percentile, _reset_hwm, _rss_kb, _strict_malloc

COLUMNS = [
    "bench", "mode", "status", "device", "device_name", "threads", "dtype", "model", "batch",
    "image_tokens", "prompt_tokens", "response_tokens", "sequences", "tokens_per_pass",
    "vision_runs_per_step", "steps", "p20_s", "p50_s", "p80_s", "time_vs_plain", "peak_mib",
    "peak_vs_plain", "computed_tflop", "computed_flop_vs_plain", "first_loss", "plan",
    "load1_start", "load1_end", "commit", "torch_version", "transformers_version", "timestamp",
]  # fmt: skip
MODES = ("plain", "shared")
MARK = "@@TRAIN_STEP@@ "


_EXTRA = {  # the config's ``extra`` sections this benchmark reads, and their keys
    "tiny": ("hidden", "layers", "image_side", "vision_hidden", "vision_layers"),
    "data": ("examples", "prompt_words", "response_words", "seed"),
}


def _extra(cfg) -> dict[str, dict[str, Any]]:
    """``extra.tiny`` (``build_tiny`` arguments) and ``extra.data``, checked."""
    out = {}
    for section, keys in _EXTRA.items():
        sec = cfg.extra.get(section, {})
        if not isinstance(sec, dict):
            raise ValueError(f"config extra.{section} must be a mapping, got {sec!r}")
        unknown = sorted(set(sec) - set(keys))
        if unknown:
            raise ValueError(f"config extra.{section}: unknown keys {unknown}; known: {keys}")
        out[section] = sec
    return out


def bench_records(out_dir: str, data: dict[str, Any]) -> str:
    """Generated scans (every one with a lesion-corrupted v') and records whose prompt has
    ``prompt_words`` words and whose answers ``response_words`` = [lo, hi] words, y- a minimal
    edit of y+ (1-2 tagged words replaced, so the lengths may differ by one)."""
    from fgpo.data import load_records, write_records
    from fgpo.models import tiny
    from fgpo.pairs.synthetic import make_preference_set

    n, seed = int(data.get("examples", 8)), int(data.get("seed", 0))
    lo, hi = (int(x) for x in data.get("response_words", (8, 24)))
    n_prompt = int(data.get("prompt_words", 20))
    path = make_preference_set(out_dir, n=n, seed=seed, corrupt_every=1)
    words = [w for w in tiny.vocabulary() if w.isalpha()]
    rng = random.Random(seed)
    records = load_records(path)
    for rec in records:
        if not rec.get("rejected_image_path"):
            raise RuntimeError(f"record {rec['id']} got no corrupted image; all four are timed")
        answer = rng.choices(words, k=rng.randint(lo, hi))
        k = rng.randrange(len(answer))
        span = answer[k : k + rng.randint(1, 2)]
        edit = rng.choices([w for w in words if w not in span], k=rng.randint(1, 2))
        head, tail = " ".join(answer[:k]), " ".join(answer[k + len(span) :])
        rec["prompt"] = " ".join(rng.choices(words, k=n_prompt)) + " ?"
        rec["chosen"] = f"{head} <mask>{' '.join(span)}</mask> {tail}".strip()
        rec["rejected"] = f"{head} <mask>{' '.join(edit)}</mask> {tail}".strip()
    return str(write_records(records, path))


def _dims(config) -> tuple[LMDims, VisionDims]:
    """The FLOP counter's dimensions of a Qwen2.5-VL-style config."""
    t, v = config.get_text_config(), config.vision_config
    heads = t.num_attention_heads
    lm = LMDims(t.hidden_size, t.intermediate_size, t.num_hidden_layers, heads,
                t.num_key_value_heads, t.hidden_size // heads)  # fmt: skip
    vision = VisionDims(
        v.hidden_size, v.intermediate_size, v.depth, len(v.fullatt_block_indexes),
        (v.window_size // v.patch_size) ** 2, v.spatial_merge_size**2, v.out_hidden_size,
    )  # fmt: skip
    return lm, vision


def _layout(tr, b) -> dict[str, Any]:
    """Token counts of the micro-batch in both layouts."""
    from fgpo import models as M

    att, ids = b["attention_mask"], b["input_ids"]
    lengths = att.sum(-1).tolist()
    image = (ids == tr.processor.image_token_id).sum(-1)
    first = (b["targets"] != -100).float().argmax(-1) + 1  # response starts here
    resp = att.sum(-1) - first
    pk = M.prefix.pack(b, tr.prefix.family, M.backbone(tr.model), tr.processor.pad_token_id)
    seg = pk.segments
    rows = [tuple(int((seg[r] == k).sum()) for k in (0, 1, 2)) for r in range(seg.shape[0])]
    return {
        "lengths": lengths,
        "rows": rows,
        "image_tokens": int(image.max()),
        "prompt_tokens": f"{float((first - image).float().mean()):.1f}",
        "response_tokens": f"{int(resp.min())}-{int(resp.max())} "
        f"(mean {float(resp.float().mean()):.1f})",
        "packed_tokens": pk.tokens,
    }


def _time_step(tr, micro, dev: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    row = tr.train_step(0, micro)
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, row["loss"]


def _peak_mib(tr, micro, dev: str) -> float:
    """Peak memory of the first training step (optimizer state included) above what the
    process holds once the model and the batch are loaded."""
    gc.collect()
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tr.train_step(0, micro)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    rss0, _ = _rss_kb()
    if not _reset_hwm():
        return float("nan")
    tr.train_step(0, micro)
    return (_rss_kb()[1] - rss0) / 1024


def _setup(cfg, train_file: str | None, work: str):
    """The tiny model of ``extra.tiny`` and the records of ``extra.data`` (written once)."""
    from fgpo.models import tiny

    extra = _extra(cfg)
    build = {k: int(v) for k, v in extra["tiny"].items()}
    cfg.train_file = train_file or bench_records(os.path.join(work, "data"), extra["data"])
    cfg.output_dir = os.path.join(work, "run")
    cfg.device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    model, proc = tiny.build_tiny(cfg.model, seed=cfg.seed, **build)
    return model.to(getattr(torch, cfg.dtype)), proc, build


def _trainer(cfg, model, proc, mode: str):
    from fgpo.train import Trainer

    c = copy.deepcopy(cfg)
    c.shared_prefix = mode == "shared"
    tr = Trainer(c, model=copy.deepcopy(model), processor=proc)
    tr.load()
    tr.load_data()
    return tr


def memory_worker(args: argparse.Namespace) -> dict[str, float]:
    """A fresh process per mode, so that neither mode reuses memory the other freed."""
    cfg = _config(args)
    if not torch.cuda.is_available() or cfg.device == "cpu":
        _strict_malloc()
    model, proc, _ = _setup(cfg, args.train_file, tempfile.mkdtemp(prefix="fgpo_bench_mem_"))
    tr = _trainer(cfg, model, proc, args.memory_worker)
    micro = tr.encode(0)
    return {"peak_mib": _peak_mib(tr, micro, cfg.device)}


def _spawn_memory(args: argparse.Namespace, mode: str, train_file: str) -> float:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--config", args.config,
           "--memory-worker", mode, "--train-file", train_file]  # fmt: skip
    for o in args.overrides:
        cmd += ["--set", o]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith(MARK)]
    if out.returncode or not line:
        raise RuntimeError(f"memory worker ({mode}) failed:\n{out.stderr[-3000:]}")
    return float(json.loads(line[0][len(MARK) :])["peak_mib"])


def _config(args: argparse.Namespace):
    from fgpo.train import TrainConfig

    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    if args.threads:
        cfg.cpu_threads = args.threads
    return cfg


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import transformers

    cfg = _config(args)
    work = tempfile.mkdtemp(prefix="fgpo_bench_prefix_")
    model, proc, build = _setup(cfg, None, work)
    dev = cfg.device
    trainers = {m: _trainer(cfg, model, proc, m) for m in MODES}
    micro = {m: trainers[m].encode(0) for m in MODES}
    b = micro["plain"][0]
    lay = _layout(trainers["shared"], b)
    load_start = os.getloadavg()[0]
    first = {}
    for _ in range(args.warmup):
        for m in MODES:
            first.setdefault(m, _time_step(trainers[m], micro[m], dev)[1])
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(args.steps):
        for m in MODES if i % 2 == 0 else MODES[::-1]:
            times[m].append(_time_step(trainers[m], micro[m], dev)[0])
    load_end = os.getloadavg()[0]
    plan = trainers["shared"].prefix
    trainers.clear()
    peaks = {m: _spawn_memory(args, m, cfg.train_file) for m in MODES}
    lm, vision = _dims(model.config)
    flops = step_flops(lm, vision, lay["image_tokens"], lay["lengths"], lay["rows"],
                       checkpointing=cfg.gradient_checkpointing,
                       share_vision=plan.share_vision)  # fmt: skip
    n_img = len(lay["lengths"])
    base = {
        "bench": "train_step_prefix", "status": "ok", "device": dev,
        "device_name": _device_name(dev), "threads": torch.get_num_threads(),
        "dtype": cfg.dtype, "model": f"{cfg.model} {json.dumps(build, sort_keys=True)}",
        "batch": b["batch_size"], "image_tokens": lay["image_tokens"],
        "prompt_tokens": lay["prompt_tokens"], "response_tokens": lay["response_tokens"],
        "steps": args.steps, "load1_start": f"{load_start:.2f}", "load1_end": f"{load_end:.2f}",
        "commit": _git_commit(), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    p50 = {m: _percentile(times[m], 0.5) for m in MODES}
    detail = {
        "plain": dict(sequences=f"{n_img} rows", tokens=sum(lay["lengths"]), vision=2 * n_img,
                      flop=flops["plain_flop"], plan="plain (shared_prefix: false)"),
        "shared": dict(sequences=f"{len(lay['rows'])} packed rows", tokens=lay["packed_tokens"],
                       vision=len(lay["rows"]) * (1 if plan.share_vision else 2),
                       flop=flops["shared_flop"], plan=plan.describe()),
    }  # fmt: skip
    rows = []
    for m in MODES:
        d = detail[m]
        rows.append({
            **base, "mode": m, "sequences": d["sequences"], "tokens_per_pass": d["tokens"],
            "vision_runs_per_step": d["vision"],
            "p20_s": f"{_percentile(times[m], 0.2):.4f}", "p50_s": f"{p50[m]:.4f}",
            "p80_s": f"{_percentile(times[m], 0.8):.4f}",
            "time_vs_plain": f"{p50[m] / p50['plain']:.3f}", "peak_mib": f"{peaks[m]:.1f}",
            "peak_vs_plain": f"{peaks[m] / peaks['plain']:.3f}" if peaks["plain"] > 0 else "",
            "computed_tflop": f"{d['flop'] / 1e12:.4f}",
            "computed_flop_vs_plain": f"{d['flop'] / flops['plain_flop']:.3f}",
            "first_loss": f"{first[m]:.6f}", "plan": d["plan"],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="bench_prefix", help="a YAML file or a shipped config")
    p.add_argument("--steps", type=int, default=7, help="timed steps per mode (>= 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="overrides cpu_threads")
    p.add_argument("--out", default=None, help="append the rows to this CSV")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--memory-worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        print(MARK + json.dumps(memory_worker(args)), flush=True)
        return 0
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    rows = run(args)
    for r in rows:
        print(
            f"{r['mode']:6s} p50 {float(r['p50_s']):.3f} s (x{r['time_vs_plain']}), peak "
            f"{r['peak_mib']} MiB (x{r['peak_vs_plain']}), {r['tokens_per_pass']} tokens/pass, "
            f"{r['vision_runs_per_step']} vision runs, computed {r['computed_tflop']} TFLOP "
            f"(x{r['computed_flop_vs_plain']}), first loss {r['first_loss']}"
        )
    r = rows[0]
    print(f"{r['device_name']}, {r['threads']} thread(s), load {r['load1_start']} -> "
          f"{r['load1_end']}; B={r['batch']}, image tokens {r['image_tokens']}, prompt "
          f"{r['prompt_tokens']}, responses {r['response_tokens']}")  # fmt: skip
    if args.out:
        path = Path(args.out)
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
