"""The demo's three figures, each answering one question a reader has (units and seeds stated).

- ``training_curves.png``: does the SFT start learn the task, and how do test accuracy and the
  grounding score move during each preference run?
- ``results_bars.png``: where does each run end, on both metrics, seed by seed?
- ``examples.png``: what do the model and the visual term see: a scan, the lesion removed
  (the demo's corruption) and the lesion with the paper's noise?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import LABELS, METHODS, REPORT_KEYS

_COLORS = {"after": "C3", "fire_mpo_no_visual": "C1", "dpo": "C0", "sft_continue": "C2"}
_ORDER = ("before", "after", "fire_mpo_no_visual", "dpo", "sft_continue")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _eval_curve(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def training_curves(
    out: Path, sft_rows: list[dict], runs: dict[str, list[list[dict]]], before: dict, seeds
) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    x, y = _eval_curve(sft_rows, "eval/closed_accuracy")
    ax[0].plot(x, y, "o-", color="0.3")
    lo = min([*y.tolist(), 0.5]) if len(y) else 0.5
    ax[0].set(
        title="SFT warm-up (clear lesions): test accuracy",
        xlabel="SFT step",
        ylabel="closed accuracy (fraction correct)",
        ylim=(max(0.0, lo - 0.05), 1.0),
    )
    seed_text = ", ".join(str(s) for s in seeds)
    for a, key, unit, title in (
        (ax[1], "eval/closed_accuracy", "closed accuracy (fraction correct)", "test accuracy"),
        (ax[2], "eval/grounding_score", "grounding score (nats)", "test grounding score"),
    ):
        start = before["closed_accuracy" if "accuracy" in key else "grounding_score"]
        for m in METHODS:
            curves = [_eval_curve(r, key) for r in runs.get(m, [])]
            if not curves:
                continue
            xs = np.concatenate([[0], curves[0][0]])
            ys = np.array([np.concatenate([[start], c[1]]) for c in curves])
            label = LABELS[REPORT_KEYS[m]]
            color = _COLORS[REPORT_KEYS[m]]
            a.plot(xs, ys.mean(0), "o-", color=color, label=label, ms=3)
            a.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)
        a.axhline(start, color="0.5", ls=":", lw=1, label="SFT start")
        a.set(xlabel="step of the run from the SFT start", ylabel=unit, title=f"runs: {title}")
    ax[1].legend(fontsize=7)
    fig.suptitle(
        f"lines: mean over seeds {seed_text}; bands: min to max over the seeds; dotted: SFT start",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=80)
    plt.close(fig)
    return "training_curves.png"


def results_bars(out: Path, report: dict[str, Any]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
    labels = [LABELS[k] for k in _ORDER]
    ypos = np.arange(len(_ORDER))[::-1]
    for a, metric, unit in (
        (ax[0], "closed_accuracy", "closed accuracy (fraction correct)"),
        (ax[1], "grounding_score", "grounding score (nats)"),
    ):
        means = [report[k][metric] for k in _ORDER]
        errs = [report[k].get(f"{metric}_std", 0.0) for k in _ORDER]
        colors = [_COLORS.get(k, "0.6") for k in _ORDER]
        a.barh(ypos, means, xerr=errs, capsize=4, color=colors, alpha=0.8)
        for y, k in zip(ypos, _ORDER):
            vals = report[k].get(f"{metric}_per_seed", [report[k][metric]])
            a.plot(vals, [y] * len(vals), "k.", ms=5)
        a.set_yticks(ypos, labels, fontsize=9)
        a.set_xlabel(unit)
        a.set_title(f"{unit.split(' (')[0]}: mean ± std over seeds (dots: each seed)", fontsize=10)
        if metric == "closed_accuracy":
            vals = [v for k in _ORDER for v in report[k].get(f"{metric}_per_seed", [])]
            a.set_xlim(max(0.0, min(vals) - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(out / "results_bars.png", dpi=80)
    plt.close(fig)
    return "results_bars.png"


def examples_figure(out: Path, rows: list[tuple[str, list[tuple[str, Any]]]]) -> str:
    """``rows``: (row title, [(column title, image), ...]); the same columns in every row."""
    plt = _pyplot()
    n_cols = len(rows[0][1])
    fig, ax = plt.subplots(len(rows), n_cols, figsize=(2.3 * n_cols, 2.1 * len(rows)))
    for i, (title, cols) in enumerate(rows):
        for j, (name, im) in enumerate(cols):
            a = ax[i, j]
            a.imshow(np.asarray(im.convert("L")), cmap="gray", vmin=0, vmax=255)
            a.set_xticks([])
            a.set_yticks([])
            if i == 0:
                a.set_title(name, fontsize=9)
            if j == 0:
                a.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=80)
    plt.close(fig)
    return "examples.png"
