"""The demo's report: means and spreads over seeds, a verdict computed from the numbers, and
the Markdown table the README shows."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import LABELS


def seed_stats(per_seed: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": list(seeds)}
    for key in ("closed_accuracy", "grounding_score", "well_formed"):
        vals = [float(r[key]) for r in per_seed]
        out[key] = float(np.mean(vals))
        out[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[f"{key}_per_seed"] = vals
    return out


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Plain statements computed from the numbers: FiRe-MPO against each other run, per metric.

    "above"/"below" compare means over seeds; a difference is called clear only when it exceeds
    the larger of the two runs' standard deviations over seeds (with 3 seeds, a rough guide)."""
    after = report["after"]
    lines, table = [], {}
    for other in ("before", "dpo", "sft_continue", "fire_mpo_no_visual"):
        o = report[other]
        table[other] = {}
        for key, unit, scale in (
            ("closed_accuracy", "points", 100.0),
            ("grounding_score", "nats", 1.0),
        ):
            d = after[key] - o[key]
            noise = max(after.get(f"{key}_std", 0.0), o.get(f"{key}_std", 0.0))
            word = "above" if d > 0 else "below" if d < 0 else "equal to"
            clear = abs(d) > noise
            table[other][key] = {"diff": d, "clear": clear}
            lines.append(
                f"FiRe-MPO is {word} {LABELS[other]} on {key.replace('_', ' ')} by "
                f"{abs(d) * scale:.2f} {unit} "
                f"({'more' if clear else 'not more'} than the seed-to-seed std "
                f"{noise * scale:.2f})."
            )
    for other in ("after", "dpo", "sft_continue", "fire_mpo_no_visual"):
        wf = report[other].get("well_formed")
        if wf is not None and wf < 0.95:
            lines.append(
                f"{LABELS[other]}: only {wf * 100:.1f}% of its answers are well formed (exactly an "
                "answer template); its grounding score partly measures a lower log-prob of the "
                "answer's format words, not only of the decision."
            )
    beats_start = all(
        table["before"][k]["diff"] > 0 for k in ("closed_accuracy", "grounding_score")
    )
    beats_all = all(
        table[o][k]["diff"] > 0 for o in table for k in ("closed_accuracy", "grounding_score")
    )
    if beats_all:
        head = (
            "FiRe-MPO is above the SFT start and every baseline on both metrics (means over seeds)."
        )
    elif beats_start:
        losers = sorted(
            {
                LABELS[o]
                for o in table
                if o != "before"
                for k in table[o]
                if table[o][k]["diff"] <= 0
            }
        )
        head = (
            "FiRe-MPO improves on the SFT start on both metrics, but is not above every other "
            "run on every metric: it is not above " + " / ".join(losers) + " on at least one "
            "metric (see the details)."
        )
    else:
        head = "FiRe-MPO does NOT improve on the SFT start on both metrics in this run."
    return {"summary": head, "details": lines, "diffs": table}


def format_table(report: dict[str, Any]) -> str:
    """The report's results as a Markdown table (mean ± std over seeds, then each seed)."""
    rows = [
        "| run | closed accuracy | grounding score (nats) | well-formed answers "
        "| accuracy per seed | grounding per seed |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("before", "after", "fire_mpo_no_visual", "dpo", "sft_continue"):
        r = report[k]
        acc = ", ".join(f"{v:.3f}" for v in r["closed_accuracy_per_seed"])
        gs = ", ".join(f"{v:.2f}" for v in r["grounding_score_per_seed"])
        rows.append(
            f"| {LABELS[k]} | {r['closed_accuracy']:.3f} ± {r['closed_accuracy_std']:.3f} | "
            f"{r['grounding_score']:.2f} ± {r['grounding_score_std']:.2f} | "
            f"{r['well_formed']:.3f} | {acc} | {gs} |"
        )
    return "\n".join(rows)
