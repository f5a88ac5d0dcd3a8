"""Table, validation and plot of the simulated sweep (``benchmarks/memory_model.py``).

Everything here is labelled: SIMULATED WITH FAKE TENSORS, NOT MEASURED ON A GPU.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

LABEL = "simulated with fake tensors, not measured on a GPU"
GIB, GB = 2**30, 1e9
CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspaces: what a tensor tracker cannot see
PUBLISHED_GB, CARD_GB = 139.0, 143.0  # FiRe-MPO recipe on an H200 (the authors' notes)
GOAL_GB = 24.0  # a consumer card
CATS = ("params", "grads", "activations", "temporaries", "optimizer", "other")


def _rows(csv_path: Path) -> list[dict[str, Any]]:
    with open(csv_path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "ok"]


def _find(rows, **want) -> list[dict[str, Any]]:
    return [r for r in rows if all(str(r[k]) == str(v) for k, v in want.items())]


def _gib(r: dict, key: str = "simulated_peak_gib") -> float:
    return float(r[key])


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "micro-batch", "checkpointing", "way", "impl", "options", "image tokens",
            "seq len", "simulated peak GiB", *(f"{c} GiB" for c in CATS)]  # fmt: skip
    lines = ["Simulated with fake tensors, not measured on a GPU. GiB = 2^30 bytes; tensors "
             "only (add the CUDA context, ~0.5 GiB, and allocator slack for nvidia-smi).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    order = {"ours": 0, "materialized": 1}
    for r in sorted(
        rows,
        key=lambda r: (
            r["model"],
            int(r["micro_batch"]),
            r["checkpointing"],
            order.get(r["way"], 2),
            r["impl"],
            r["options"],
        ),
    ):
        opts = "" if r["options"] in ("{}", "") else r["options"]
        cells = [r["model"], r["micro_batch"], r["checkpointing"], r["way"], r["impl"], opts,
                 r["image_tokens"], r["seq_len"], f"**{_gib(r):.1f}**",
                 *(f"{float(r[f'simulated_{c}_gib']):.2f}" for c in CATS)]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def validation(rows: list[dict[str, Any]]) -> str:
    """The published 139 GB against the simulation of the same setting, with the overhead."""
    out = [
        "## Validation against the published figure (" + LABEL + ")",
        "",
        "The reference recipe (Qwen3-VL-4B, micro-batch 8, gradient checkpointing, the "
        "straightforward way) was reported at ~139 GB of a 143 GB H200, and out of memory "
        "without checkpointing. An H200 shows 143771 MiB in nvidia-smi, so the figures read "
        "as thousands of MiB; as decimal GB they would be 2.4 % smaller. Both readings:",
        "",
    ]
    hits = _find(rows, model="qwen3-vl-4b", micro_batch=8, checkpointing="on", way="materialized")
    if not hits:
        return "\n".join([*out, "(not simulated yet)"])
    for r in sorted(hits, key=lambda r: int(r["image_tokens"])):
        sim = _gib(r)
        total = sim + CONTEXT_GIB
        out.append(
            f"- images of {r['image_size']} px, max_pixels {r['max_pixels']} "
            f"({r['image_tokens']} image tokens, sequences of {r['seq_len']}): "
            f"simulated {sim:.1f} GiB + {CONTEXT_GIB} GiB CUDA context = {total:.1f} GiB"
        )
        for unit, factor in (("thousand MiB", 1000 * 2**20 / GIB), ("GB", GB / GIB)):
            pub = PUBLISHED_GB * factor
            verdict = "within" if 0.8 <= total / pub <= 1.2 else "OUTSIDE"
            out.append(f"  - against 139 {unit} = {pub:.1f} GiB: ratio {total / pub:.2f}, "
                       f"**{verdict} ±20 %**")  # fmt: skip
        off = _find(rows, model="qwen3-vl-4b", micro_batch=8, checkpointing="off",
                    way="materialized", max_pixels=r["max_pixels"])  # fmt: skip
        if off:
            cap = CARD_GB * 1000 * 2**20 / GIB
            fits = "fits" if _gib(off[0]) + CONTEXT_GIB <= cap else "out of memory"
            out.append(
                f"  - without checkpointing: {_gib(off[0]):.1f} GiB: {fits} on the "
                f"{cap:.1f} GiB card (published: out of memory)"
            )
    return "\n".join(out)


def goal(rows: list[dict[str, Any]]) -> str:
    out = ["## The goal: Qwen2.5-VL-7B, micro-batch 4, checkpointing, in 24 GB (" + LABEL + ")",
           "", "Every simulated Qwen2.5-VL-7B step with checkpointing at the default sequences "
           "(micro-batch 4 is the goal; smaller micro-batches and LoRA settings show what would "
           "fit):", ""]  # fmt: skip
    limit = GOAL_GB * GB / GIB
    hits = [r for r in _find(rows, model="qwen2.5-vl-7b", checkpointing="on")
            if str(r.get("max_pixels")) == str(512 * 28 * 28)
            and (r["way"] == "ours" or int(r["micro_batch"]) == 4)]  # fmt: skip
    order = {"ours": 0, "materialized": 1}
    for r in sorted(hits, key=lambda r: (order[r["way"]], -int(r["micro_batch"]), r["options"],
                                         r["impl"])):  # fmt: skip
        total = _gib(r) + CONTEXT_GIB
        verdict = "fits" if total <= limit else "does NOT fit"
        opts = "" if r["options"] in ("{}", "") else f", {r['options']}"
        out.append(f"- {r['way']} ({r['impl']}), micro-batch {r['micro_batch']}{opts}: "
                   f"{_gib(r):.1f} GiB + {CONTEXT_GIB} GiB context = {total:.1f} GiB vs "
                   f"{limit:.1f} GiB (24 GB): **{verdict}** (weights "
                   f"{float(r['simulated_params_gib']):.1f}, activations "
                   f"{float(r['simulated_activations_gib']):.1f})")  # fmt: skip
    return "\n".join(out)


_PLAIN = ("{}", '{"shared_prefix": false}')
_SHARED = '{"shared_prefix": true}'


def _pick(rows: list[dict[str, Any]], way: str, options: tuple[str, ...]) -> float | None:
    hit = [r for r in rows if r["way"] == way and r["options"] in options
           and r["impl"] in ("triton", "-")]  # fmt: skip
    return _gib(hit[0]) if hit else None


def _cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def summary(rows: list[dict[str, Any]]) -> str:
    """Ours (triton; with the shared prefix, the trainer's default, and plain) next to the
    straightforward way, per model, micro-batch and checkpointing, at the default sequences
    (SLAKE-like, images capped at 512·28·28 pixels) and LoRA settings."""
    base = [r for r in rows if str(r.get("max_pixels")) == str(512 * 28 * 28)
            and r["options"] in (*_PLAIN, _SHARED)]  # fmt: skip
    lines = ["| model | micro-batch | checkpointing | seq len | ours, shared prefix GiB | "
             "ours, plain GiB | materialized GiB | ours (shared) / materialized |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["model"], int(r["micro_batch"]), r["checkpointing"]) for r in base},
                  key=lambda k: (k[0], k[1], k[2] != "on"))  # fmt: skip
    for model, b, ckpt in keys:
        same = _find(base, model=model, micro_batch=b, checkpointing=ckpt)
        shared, plain = _pick(same, "ours", (_SHARED,)), _pick(same, "ours", _PLAIN)
        mat = _pick(same, "materialized", _PLAIN)
        ratio = "–" if shared is None or mat is None else f"{shared / mat:.2f}"
        lines.append(f"| {model} | {b} | {ckpt} | {same[0]['seq_len']} | **{_cell(shared)}** | "
                     f"{_cell(plain)} | {_cell(mat)} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    styles = {("ours", "on"): ("tab:blue", ""), ("ours", "off"): ("tab:blue", "//"),
              ("materialized", "on"): ("tab:red", ""),
              ("materialized", "off"): ("tab:red", "//")}  # fmt: skip
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["impl"] in ("triton", "-")
                and str(r.get("max_pixels")) == str(512 * 28 * 28)
                and r["options"] in ((_SHARED,) if r["way"] == "ours" else _PLAIN)]  # fmt: skip
        batches = sorted({int(r["micro_batch"]) for r in mine})
        for k, ((way, ckpt), (color, hatch)) in enumerate(styles.items()):
            xs, ys = [], []
            for i, b in enumerate(batches):
                hit = _find(mine, micro_batch=b, way=way, checkpointing=ckpt)
                if hit:
                    xs.append(i + (k - 1.5) * 0.2)
                    ys.append(_gib(hit[0]) * GIB / GB)
            label = f"{way}, checkpointing {ckpt}" + (
                " (triton, shared prefix)" if way == "ours" else ""
            )
            ax.bar(xs, ys, 0.2, color=color, hatch=hatch, edgecolor="black", label=label)
        ax.axhline(GOAL_GB, color="green", ls="--", lw=1, label="24 GB (consumer card)")
        ax.axhline(CARD_GB * 1000 * 2**20 / GB, color="gray", ls=":", lw=1,
                   label="H200 (143 000 MiB)")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("micro-batch (examples, 4 sequences each)")
        ax.set_title(model)
    axes[0][0].set_ylabel("peak memory, GB (tensors; simulated)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("FiRe-MPO training step, bf16, LoRA r=128, AdamW: peak memory "
                 f"({LABEL.upper()})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START, README_END = "<!-- memsim:start", "<!-- memsim:end -->"


def update_readme(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the README's block between the memsim markers: validation, goal, summary."""
    text = Path(path).read_text(encoding="utf-8")
    a, b = text.find(README_START), text.find(README_END)
    if a < 0 or b < a:
        raise ValueError(f"{path}: no '{README_START} ... {README_END}' block to rewrite")
    a = text.index("\n", a) + 1
    body = "\n\n".join([validation(rows).replace("## ", "#### ", 1),
                         goal(rows).replace("## ", "#### ", 1), summary(rows)])  # fmt: skip
    Path(path).write_text(text[:a] + body + "\n" + text[b:], encoding="utf-8")


def write_report(csv_path: Path, out: Path, readme: Path | None = None) -> None:
    """``simulated_memory.md`` (table, validation, goal) and the plot, from the CSV; the
    README's memsim block too when ``readme`` is given."""
    if not Path(csv_path).exists():
        return
    rows = _rows(Path(csv_path))
    if readme is not None:
        update_readme(readme, rows)
    text = "\n\n".join([f"# Peak memory of a training step ({LABEL})", validation(rows),
                        goal(rows), "## Ours next to the straightforward way", summary(rows),
                        "## All configurations", table(rows)])  # fmt: skip
    (out / "simulated_memory.md").write_text(text + "\n", encoding="utf-8")
    if rows:
        plot(rows, out / "simulated_memory_not_measured_on_gpu.png")
