"""``fgpo demo --out DIR``: the embedded end-to-end run (CPU, no network, no downloads).

Every step is the product's own code on generated data; the demo only wires them together:

    data      generated lesion scans with closed questions (``fgpo.data.synthetic``): warm-up
              (clear lesions), pref (the preference examples) and test splits, as PNGs + masks
    sft       ``fgpo.train.Trainer`` with ``preset: sft`` trains a tiny LLaVA
              (``fgpo.models.tiny``) from scratch on the clear lesions, stopped early: the
              "SFT start" every other run begins from
    prepare   ``fgpo.pairs.prepare_pairs``: the SFT start's greedy answers on the pref split,
              minimal edits by ``ReferenceEditor``, lesion-removed images by ``fgpo.pairs.corrupt``
              (mode ``inpaint``: see README "Demo" for why not ``noise``)
    train     per seed, each a ``Trainer`` run from the SFT start: FiRe-MPO, DPO, FiRe-MPO
              without the visual term (γ = 0), and continued SFT on the same examples (the honest
              control); test accuracy and grounding every ``eval_every`` steps
    report    ``DIR/report.json`` (means, standard deviations, per-seed values, a verdict
              computed from the numbers) and three PNG figures; ``--publish`` copies them to a
              folder and ``--readme`` rewrites the README's results table
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data import open_image, synthetic, write_records
from ..models import tiny
from ..models.inference import greedy_answers
from ..pairs import CorruptConfig, ReferenceEditor, corrupt_image, prepare_pairs
from ..train import Trainer
from . import plots
from .config import LABELS, METHODS, REPORT_KEYS, DemoConfig
from .evaluation import EvalSet, evaluate_model, evidence_check
from .report import format_table, seed_stats, verdict

README_START = "<!-- demo-results:start (written by `make demo`) -->"
README_END = "<!-- demo-results:end -->"
_METRICS = ("closed_accuracy", "grounding_score", "well_formed")


def _progress(items, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, dynamic_ncols=True, leave=False)


def make_data(cfg: DemoConfig, root: Path) -> dict[str, list]:
    """The three splits as ``VQAExample`` lists (PNG scans and masks under ``root``)."""
    specs = {
        "warm": (cfg.n_warm, cfg.data_seed + 3, cfg.warm_contrast),
        "pref": (cfg.n_pref, cfg.data_seed + 1, cfg.contrast),
        "test": (cfg.n_test, cfg.data_seed + 2, cfg.contrast),
    }
    out = {}
    for split, (n, seed, contrast) in _progress(specs.items(), "data: generate scans"):
        raw = synthetic.make_dataset(n, seed, contrast=contrast, prefix=split)
        out[split] = synthetic.write_examples(raw, root / split)
    return out


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_CURVE_KEYS = ("step", "loss", "rewards/margins", "eval/closed_accuracy", "eval/grounding_score")


def _curve(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the report keeps of a run's metrics rows (the full rows stay in its metrics.jsonl)."""
    return [{k: r[k] for k in _CURVE_KEYS if k in r} for r in rows]


def _final(rows: list[dict[str, Any]]) -> dict[str, float]:
    last = [r for r in rows if "eval/closed_accuracy" in r][-1]
    return {k: last[f"eval/{k}"] for k in _METRICS}


def _train(cfg, method, seed, train_file, out, model, proc, test_set) -> list[dict[str, Any]]:
    tc = cfg.train_config(method, seed, train_file, out)
    trainer = Trainer(
        tc, model=model, processor=proc, eval_fn=lambda m: evaluate_model(m, proc, test_set)
    )
    trainer.train()
    return _read_rows(out)


def _example_rows(es: EvalSet, mode: str, k: int = 5):
    rows = []
    picked = [i for i, e in enumerate(es.examples) if e.has_lesion][:k]
    for i in picked:
        ex, im = es.examples[i], es.images[i]
        removed = corrupt_image(im, ex, CorruptConfig(mode=mode, fallback="skip")).image
        noisy = corrupt_image(im, ex, CorruptConfig(mode="noise", fallback="skip")).image
        cols = [
            ("the scan", im),
            (f"lesion removed ({mode})\nthe demo's v'", removed),
            ("noise in the lesion\nthe paper's v'", noisy),
        ]
        rows.append((ex.meta["template"], cols))
    return rows


def update_readme(path: Path, report: dict[str, Any]) -> None:
    """Replace the text between the README's demo-results markers with the new table."""
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START!r} ... {README_END!r} block to rewrite")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    setup = report["setup"]
    timings = setup["timings_s"]
    body = (
        f"\n{format_table(report)}\n\n"
        f"Means ± standard deviations over seeds {', '.join(map(str, report['after']['seeds']))}"
        f" (the SFT start is one model). Test split: {report['before']['n_closed']} questions "
        f"for accuracy, {report['before']['n_grounding']} with a lesion for the grounding score."
        f" {setup['pairs']} pairs, {setup['pairs_from_wrong_answers']} of them from wrong "
        f"answers. This run: {setup['machine']}, torch threads: {setup['threads']}, "
        f"{timings['total'] / 60:.1f} min wall, {timings['cpu'] / 60:.1f} min of CPU time (the "
        "wall time grows when other jobs share the CPU).\n"
    )
    path.write_text(head + README_START + body + README_END + tail, encoding="utf-8")


# ----------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (report.json, plots, data, runs)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI): same code path, ~1 min")
    p.add_argument("--seeds", type=int, default=3, help="seeds per preference method (>= 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: fastest for this tiny model, and the digits then do not "
        "depend on the core count; 0 = torch's default)",
    )
    p.add_argument("--publish", help="also copy report.json and the figures to this folder")
    p.add_argument("--readme", help="rewrite the results table in this README (between markers)")


def run(args) -> int:
    if args.seeds < 1:
        raise SystemExit(f"fgpo demo: --seeds must be >= 1, got {args.seeds}")
    # the 'train' extra, checked before any work (the CLI turns the error into its install line)
    import matplotlib  # noqa: F401
    import transformers  # noqa: F401

    t0, c0 = time.time(), time.process_time()
    torch.set_flush_denormal(True)  # tiny models hit denormals early: ~20x slower without
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig.quick() if args.quick else DemoConfig.full()
    cfg.seeds = list(range(1, args.seeds + 1))
    out = Path(args.out)
    for sub in ("data", "warm", "pairs", "runs"):  # the demo's own outputs of an earlier run
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    ccfg = CorruptConfig(mode=cfg.corrupt_mode, fallback="skip")
    timings: dict[str, float] = {}
    t = time.time()

    def tick(name: str) -> None:
        nonlocal t
        timings[name] = round(time.time() - t, 1)
        t = time.time()

    # ---- data
    examples = make_data(cfg, out / "data")
    test_set = EvalSet.build(examples["test"], ccfg, cfg.max_new_tokens)
    tick("data")

    # ---- SFT warm-up (once): the product trainer, preset sft, on the clear lesions
    model, proc = tiny.build_tiny("tiny-llava", seed=cfg.data_seed)
    truth = {e.id: e.meta["template"] for e in examples["warm"]}
    warm = prepare_pairs(examples["warm"], lambda ex: truth[ex.id], ReferenceEditor(), None, out)
    warm_file = write_records(warm, out / "warm" / "pairs.json")
    sft_rows = _train(
        cfg, "sft_warmup", cfg.data_seed, warm_file, out / "runs" / "sft_warmup", model, proc,
        test_set,
    )  # fmt: skip
    start_state = copy.deepcopy(model.state_dict())
    before = evaluate_model(model, proc, test_set)
    evidence = evidence_check(model, proc, test_set)
    tick("sft")

    # ---- prepare: on-policy pairs from the SFT start's greedy answers
    pref = examples["pref"]
    images = [open_image(e.image_path) for e in _progress(pref, "prepare: read scans")]
    answers = greedy_answers(
        model, proc, images, [e.question for e in pref], max_new_tokens=cfg.max_new_tokens,
        desc="prepare: greedy answers",
    )  # fmt: skip
    by_id = {e.id: a for e, a in zip(pref, answers)}
    stats: Counter = Counter()
    records = prepare_pairs(
        _progress(pref, "prepare: edit + corrupt"), lambda ex: by_id[ex.id], ReferenceEditor(),
        ccfg, out / "pairs", stats=stats,
    )  # fmt: skip
    pairs_file = write_records(records, out / "pairs" / "pairs.json")
    n_wrong = sum(not r["was_correct"] for r in records)
    tick("prepare")

    # ---- preference runs and the control, per seed, all from the SFT start
    rows: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    jobs = [(m, s) for s in cfg.seeds for m in METHODS]
    for m, s in _progress(jobs, "runs (method x seed)"):
        model.load_state_dict(start_state)
        run_rows = _train(
            cfg, m, 1000 * s, pairs_file, out / "runs" / f"{m}-seed{s}", model, proc, test_set
        )
        res = {**_final(run_rows), "seed": s}
        print(
            f"{LABELS[REPORT_KEYS[m]]}, seed {s}: closed accuracy {res['closed_accuracy']:.3f} "
            f"(start {before['closed_accuracy']:.3f}), grounding {res['grounding_score']:.2f} "
            f"(start {before['grounding_score']:.2f}), well formed {res['well_formed']:.3f}",
            flush=True,
        )
        rows[m].append(run_rows)
        results[m].append(res)
    tick("train_and_eval")

    # ---- report
    report: dict[str, Any] = {"before": {**before, **seed_stats([before], [cfg.data_seed])}}
    for m in METHODS:
        report[REPORT_KEYS[m]] = {**seed_stats(results[m], cfg.seeds), "per_seed": results[m]}
    report["verdict"] = verdict(report)
    report["summary"] = report["verdict"]["summary"]
    report["setup"] = {
        "mode": "quick" if args.quick else "full",
        "config": asdict(cfg),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "pairs": len(records),
        "pairs_from_wrong_answers": n_wrong,
        "prepare_stats": dict(stats),
        "grounding_definition": "mean over test examples with a lesion of log p(answer | v, q) - "
        f"log p(answer | v', q), v' = lesion removed by corrupt mode '{cfg.corrupt_mode}' "
        "(fgpo.eval.grounding_score); answer = the ground truth in the model's answer format",
        "evidence_check_sft_start": evidence,
        "threads": torch.get_num_threads(),
        "machine": _machine(),
        "timings_s": timings,
    }
    files = [
        plots.training_curves(out, sft_rows, rows, before, cfg.seeds),
        plots.results_bars(out, report),
        plots.examples_figure(out, _example_rows(test_set, cfg.corrupt_mode)),
    ]
    report["plots"] = files
    report["curves"] = {"sft": _curve(sft_rows), **{m: [_curve(r) for r in rows[m]] for m in rows}}
    timings["total"] = round(time.time() - t0, 1)
    timings["cpu"] = round(time.process_time() - c0, 1)
    with open(out / "report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    if args.publish:
        dest = Path(args.publish)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", *files):
            shutil.copy2(out / name, dest / name)
    if args.readme:
        update_readme(Path(args.readme), report)
    print(format_table(report))
    print(report["summary"])
    for line in report["verdict"]["details"]:
        print("  " + line)
    print(f"wrote {out / 'report.json'} and {', '.join(files)} in {timings['total']:.0f} s")
    return 0


def _machine() -> str:
    """The CPU's model name (the digits of a run depend on it; see the README)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
