"""Peak memory and time of one FiRe-MPO training step: our trainer vs the materialized way.

Both run the same tiny LLaVA (``fgpo.tiny``; LoRA on the language model, reference = adapters
disabled), the same batch and the same optimizer step. They differ only in the loss path:

- ``ours``: ``fgpo.train.Trainer``: backbone hidden states, ``FiReMPOLoss`` projects only the
  masked rows with the fused kernels; no logits exist.
- ``materialized``: ``benchmarks.memsim.materialized.MaterializedTrainer``, the same trainer
  with the Hub forward (full fp32 (tokens x vocab) logits of all 4B policy and 4B reference
  sequences) and the objective from full distributions, as the method's reference
  implementation computes it (docs/design.md §2; also the straightforward way of
  ``python -m benchmarks.memory_model``).

Memory = the process's peak resident set during the timed steps minus its resident set before
them (``VmHWM`` reset through ``/proc/self/clear_refs``); on a GPU, ``max_memory_allocated``
above the allocation before the step. Each mode runs in a fresh process.

    python -m benchmarks.train_step_memory                      # tiny model (V=62, D=64)
    python -m benchmarks.train_step_memory --vocab 32000 --hidden 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MARK = "@@TRAIN_STEP@@ "


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(args) -> dict:
    from fgpo.models import tiny
    from fgpo.pairs.synthetic import make_preference_set
    from fgpo.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="fgpo_bench_")
    prefs = make_preference_set(os.path.join(out_dir, "data"), n=args.batch, seed=0)
    model, proc = tiny.build_tiny(
        "tiny-llava", hidden=args.hidden, layers=args.layers, vocab_size=args.vocab
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(
        model="tiny-llava",
        dtype=args.dtype,
        train_file=prefs,
        output_dir=out_dir,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lr=1e-4,
        global_batch_size=args.batch,
        micro_batch_size=args.batch,
        max_steps=args.steps + 1,
        progress_bar=False,
        tensorboard=False,
        gradient_checkpointing=True,
        impl=args.impl,
        cache_examples=True,
        device=dev,
    )
    from benchmarks.memsim.materialized import MaterializedTrainer

    cls = MaterializedTrainer if args.mode == "materialized" else Trainer
    model = model.to(getattr(torch, args.dtype))
    tr = cls(cfg, model=model, processor=proc)
    tr.load()
    tr.load_data()
    first = tr.train_step(0)  # warm-up (allocator, lazy init)
    b = tr.encode(0)[0]
    times = []
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        rss0 = _rss_kib("VmRSS")
        _reset_peak()
    for s in range(1, args.steps + 1):
        t0 = time.perf_counter()
        tr.train_step(s % tr.steps_per_epoch)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (_rss_kib("VmHWM") - rss0) / 1024
    v, d = tr.model.get_output_embeddings().weight.shape
    return dict(
        mode=args.mode,
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        dtype=args.dtype,
        batch=args.batch,
        sequences=int(b["input_ids"].shape[0]),
        seq_len=int(b["input_ids"].shape[1]),
        masked_rows=int((b[tr.mask_key] != 0).sum()),
        vocab=v,
        hidden=d,
        step_s_median=round(statistics.median(times), 4),
        peak_extra_mib=round(peak_mib, 1),
        first_step_loss=first["loss"],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("ours", "materialized"), default=None)
    p.add_argument("--vocab", type=int, default=None, help="pad the tiny vocabulary to this size")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impl", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append result rows to this JSON-lines file")
    args = p.parse_args(argv)
    if args.mode is not None:
        print(MARK + json.dumps(worker(args)), flush=True)
        return 0
    rows = []
    for mode in ("materialized", "ours"):
        cmd = [sys.executable, "-m", "benchmarks.train_step_memory", "--mode", mode]
        for k in ("vocab", "hidden", "layers", "batch", "steps", "dtype", "impl", "threads"):
            if getattr(args, k) is not None:
                cmd += [f"--{k}", str(getattr(args, k))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith(MARK)]
        if not line:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[0][len(MARK) :]))
        r = rows[-1]
        print(
            f"{r['mode']:13s} {r['device']} {r['dtype']} B={r['batch']} seqs={r['sequences']} "
            f"L={r['seq_len']} masked={r['masked_rows']} V={r['vocab']} D={r['hidden']}: "
            f"step {r['step_s_median'] * 1e3:.1f} ms, peak extra {r['peak_extra_mib']:.1f} MiB, "
            f"first loss {r['first_step_loss']:.6f}"
        )
    m, o = rows
    print(
        f"ours / materialized: time x{o['step_s_median'] / m['step_s_median']:.2f}, "
        f"memory x{o['peak_extra_mib'] / max(m['peak_extra_mib'], 1e-9):.3f}"
    )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
