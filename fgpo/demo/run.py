"""``fgpo demo --out DIR``: the embedded end-to-end run (CPU, no network, no downloads).

Named steps:

    data      a generated lesion VQA set (``fgpo.demo_data``): train (SFT), pref (the
              preference examples), test; PNG scans and lesion masks under ``DIR/data``
    sft       a tiny LLaVA (``fgpo.demo_model``) learns the task from scratch on clearly
              visible lesions, stopped early (the "SFT start" every other run begins from)
    prepare   ``fgpo.prepare.prepare_pairs``: the SFT model's greedy answers on the pref
              examples, minimal-edit pairs by ``ReferenceEditor``, lesion-removed images by
              ``fgpo.corrupt`` (mode ``inpaint``: see README "Demo" for why not ``noise``)
    train     per seed: FiRe-MPO, plain DPO, FiRe-MPO without the visual term (γ = 0), and
              continued SFT on the same examples (the honest control), all from the SFT start
    eval      closed accuracy (``fgpo.evaluate.score_answers``) and grounding score (drop of the
              ground-truth answer's log-prob when the lesion is removed; the definition of
              ``fgpo.evaluate.grounding_score``) on the test split
    report    ``DIR/report.json`` (means, standard deviations and per-seed values; a verdict
              computed from the numbers) and PNG plots

The preference runs call the public loss API (``fgpo_kernels.FiReMPOLoss`` on backbone hidden
states and the LM-head weight) from a small loop here, not ``fgpo.trainer.Trainer``: the demo's
model and tokenizer live in memory and its whole pair set fits in a few tensors.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fgpo_kernels as fk

from ..data import synthetic as dd
from . import model as dm

METHODS = ("fire_mpo", "dpo", "fire_mpo_no_visual", "sft_continue")
REPORT_KEYS = {  # report.json object per method
    "fire_mpo": "after",
    "dpo": "dpo",
    "fire_mpo_no_visual": "fire_mpo_no_visual",
    "sft_continue": "sft_continue",
}
LABELS = {
    "before": "SFT start",
    "after": "FiRe-MPO",
    "dpo": "DPO",
    "fire_mpo_no_visual": "FiRe-MPO, no visual term",
    "sft_continue": "continued SFT",
}


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of one demo run (``full()`` and ``quick()`` below)."""

    n_train: int = 3000  # mixed-contrast SFT split (used only for steps past warm_steps)
    n_pref: int = 1500  # the preference examples (pairs; continued SFT uses the same ones)
    n_test: int = 1000
    contrast: tuple[float, float] = (40.0, 100.0)  # lesion brightness above the tissue
    warm_contrast: float = 150.0  # the SFT curriculum's clear lesions (n_train // 3 scans)
    # SFT steps on the clear lesions first: with faint ones only, a tiny model sits at the
    # answer prior for thousands of steps. In the full run all SFT steps are warm-up steps:
    # the SFT start is stopped early and has never seen a faint lesion (room to improve).
    warm_steps: int = 300
    data_seed: int = 0
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 1e-3
    pref_steps: int = 150
    pref_batch: int = 32
    pref_lr: float = 2e-4  # 5e-4 already broke the answer format of this tiny model
    beta: float = 0.1
    alpha: float = 0.01
    gamma: float = 0.1
    lambda_: float = 0.5
    corrupt_mode: str = "inpaint"
    # parameter-name prefixes kept frozen in the preference runs and the control
    freeze: tuple[str, ...] = ()
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    eval_every: int = 50

    @classmethod
    def full(cls) -> DemoConfig:
        return cls()

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            n_train=256,
            n_pref=96,
            n_test=96,
            sft_steps=40,
            sft_batch=32,
            pref_steps=4,
            pref_batch=16,
            eval_every=20,
            warm_steps=20,
        )


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- model calls


class Runner:
    """The demo's model-side operations over one tokenizer."""

    def __init__(self, tok: dm.WordTokenizer, n_img: int):
        self.tok, self.n_img = tok, n_img

    def batch(self, questions, answers, images, weights=None) -> dm.Batch:
        return dm.make_batch(
            self.tok, self.n_img, questions, [self.tok.encode(a) for a in answers], images, weights
        )

    @torch.no_grad()
    def answer_logps(self, model, questions, answers, images, bs: int = 256) -> np.ndarray:
        """Summed log-prob of each answer (EOS included) given image and question."""
        model.eval()
        out = []
        for s in range(0, len(questions), bs):
            b = self.batch(questions[s : s + bs], answers[s : s + bs], images[s : s + bs])
            out.append(dm.sequence_logps(model, b).sum(-1))
        model.train()
        return torch.cat(out).numpy() if out else np.zeros(0)

    @torch.no_grad()
    def greedy(self, model, questions, images) -> list[str]:
        model.eval()
        out = dm.greedy_answers(model, self.tok, questions, images)
        model.train()
        return out


@dataclass
class EvalSet:
    examples: list[Any]  # VQAExample
    images: list[np.ndarray]
    g_idx: list[int]  # examples with a lesion region (grounding)
    g_corrupt: list[np.ndarray]  # their lesion-removed images
    g_answers: list[str]  # the ground-truth answer in the model's answer format


def make_eval_set(examples, raw: list[dd.LesionExample], cfg) -> EvalSet:
    """Corrupted images made exactly as ``fgpo.evaluate.grounding_score`` makes them."""
    from ..data import open_image
    from ..pairs.corrupt import corrupt_image

    g_idx, g_cor = [], []
    for i, ex in enumerate(examples):
        res = corrupt_image(open_image(ex.image_path), ex, cfg)
        if res.image is None or res.source == "fallback":
            continue
        g_idx.append(i)
        g_cor.append(np.asarray(res.image.convert("L")))
    return EvalSet(examples, [r.image for r in raw], g_idx, g_cor, [raw[i].answer for i in g_idx])


def evidence_check(run: Runner, model, examples, raw: list[dd.LesionExample]) -> dict[str, Any]:
    """Share of presence questions about scans WITH a lesion that the model answers "yes", on
    the clean scan and on its corrupted copies: does a corruption mode remove the evidence?"""
    from ..data import open_image
    from ..pairs.corrupt import CorruptConfig, corrupt_image

    idx = [i for i, e in enumerate(raw) if e.qtype == "presence" and e.has_lesion]
    out: dict[str, Any] = {"n": len(idx)}
    for mode in ("clean", "noise", "blur", "inpaint"):
        if mode == "clean":
            ims = [raw[i].image for i in idx]
        else:
            c = CorruptConfig(mode=mode, fallback="skip")
            ims = [
                np.asarray(corrupt_image(open_image(examples[i].image_path), examples[i], c)
                           .image.convert("L"))
                for i in idx
            ]  # fmt: skip
        ans = run.greedy(model, [raw[i].question for i in idx], ims)
        out[f"yes_rate_{mode}"] = float(
            np.mean([dd.closed_label("presence", a) == "yes" for a in ans])
        )
    return out


def evaluate_model(run: Runner, model, es: EvalSet) -> dict[str, Any]:
    from ..eval.metrics import score_answers

    preds = run.greedy(model, [e.question for e in es.examples], es.images)
    acc = score_answers(es.examples, preds)["closed_accuracy"]
    templates = set(dd.ANSWERS.values())
    well_formed = float(np.mean([p in templates for p in preds])) if preds else float("nan")
    qs = [es.examples[i].question for i in es.g_idx]
    clean = run.answer_logps(model, qs, es.g_answers, [es.images[i] for i in es.g_idx])
    bad = run.answer_logps(model, qs, es.g_answers, es.g_corrupt)
    return {
        "closed_accuracy": float(acc),
        "grounding_score": float(np.mean(clean - bad)) if len(clean) else float("nan"),
        "well_formed": well_formed,  # share of answers that are exactly an answer template
        "n_closed": len(es.examples),
        "n_grounding": len(es.g_idx),
    }


# ----------------------------------------------------------------------------- training


def _set_seed(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def train_sft(
    run: Runner,
    model,
    items: list[tuple[str, str, np.ndarray]],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    desc: str,
    on_eval=None,
    eval_every: int = 0,
    warm_items: list[tuple[str, str, np.ndarray]] | None = None,
    warm_steps: int = 0,
    freeze: tuple[str, ...] = (),
) -> list[dict[str, float]]:
    """Teacher forcing on (question, answer, image) items; returns the loss curve.

    The first ``warm_steps`` steps draw from ``warm_items`` instead (a curriculum: with faint
    lesions only, a tiny model sits at the answer prior for thousands of steps before it
    starts looking at the image; clear lesions first get it looking within a few hundred)."""
    from tqdm.auto import tqdm

    rng = _set_seed(seed)
    opt = torch.optim.AdamW(_trainable(model, freeze), lr=lr)
    model.train()
    curve = []
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        src = warm_items if warm_items is not None and step < warm_steps else items
        idx = rng.choice(len(src), size=min(batch, len(src)), replace=False)
        q, a, im = zip(*[src[i] for i in idx])
        b = run.batch(list(q), list(a), list(im))
        lp = dm.sequence_logps(model, b)
        loss = -(lp * b.weights).sum() / b.weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step + 1, "loss": float(loss.detach())}
        if on_eval is not None and eval_every and ((step + 1) % eval_every == 0 or step == 0):
            row.update(on_eval(model))
        curve.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
    return curve


@dataclass
class PairTensors:
    """The preference records, tokenized once."""

    questions: list[str]
    chosen: list[list[int]]
    rejected: list[list[int]]
    chosen_span: list[list[float]]
    rejected_span: list[list[float]]
    images: list[np.ndarray]
    corrupt: list[np.ndarray | None]
    chosen_text: list[str]


def _word_weights(text: str, spans: list[tuple[int, int]]) -> list[float]:
    """1 for each whitespace word that overlaps a span, else 0."""
    out, pos = [], 0
    for w in text.split():
        s = text.index(w, pos)
        e = s + len(w)
        pos = e
        out.append(float(any(a < e and s < b for a, b in spans)))
    return out


def encode_pairs(records: list[dict], tok: dm.WordTokenizer) -> PairTensors:
    from ..data import open_image, parse_mask_tags

    pt = PairTensors([], [], [], [], [], [], [], [])
    for r in records:
        c_text, c_spans = parse_mask_tags(r["chosen"])
        r_text, r_spans = parse_mask_tags(r["rejected"])
        pt.questions.append(r["prompt"])
        pt.chosen.append(tok.encode(c_text))
        pt.rejected.append(tok.encode(r_text))
        pt.chosen_span.append(_word_weights(c_text, c_spans))
        pt.rejected_span.append(_word_weights(r_text, r_spans))
        pt.images.append(np.asarray(open_image(r["image_path"]).convert("L")))
        rp = r.get("rejected_image_path")
        pt.corrupt.append(np.asarray(open_image(rp).convert("L")) if rp else None)
        pt.chosen_text.append(c_text)
    return pt


def _trainable(model, freeze: tuple[str, ...]) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith(tuple(freeze))]


def _states(model, ref, b: dm.Batch, mask: torch.Tensor) -> fk.SequenceStates:
    h = dm.backbone_hidden(model, b.input_ids, b.pixel_values, b.attention_mask)[:, :-1]
    with torch.no_grad():
        hr = dm.backbone_hidden(ref, b.input_ids, b.pixel_values, b.attention_mask)[:, :-1]
    return fk.SequenceStates(h, hr, b.targets, mask)


def train_preference(
    run: Runner, model, pt: PairTensors, method: str, cfg: DemoConfig, seed: int, desc: str
) -> list[dict[str, float]]:
    """One preference run from the SFT start (``model`` is modified in place)."""
    from tqdm.auto import tqdm

    if method == "sft_continue":  # the control: the same examples, their correct answers
        items = list(zip(pt.questions, pt.chosen_text, pt.images))
        return train_sft(
            run,
            model,
            items,
            cfg.pref_steps,
            cfg.pref_batch,
            cfg.sft_lr,
            seed,
            desc,
            freeze=cfg.freeze,
        )
    loss_fn = {
        "fire_mpo": lambda: fk.FiReMPOLoss.preset(
            "fire_mpo", beta=cfg.beta, alpha=cfg.alpha, gamma=cfg.gamma, lambda_=cfg.lambda_
        ),
        "fire_mpo_no_visual": lambda: fk.FiReMPOLoss.preset(
            "fire_mpo", beta=cfg.beta, alpha=cfg.alpha, gamma=0.0, lambda_=cfg.lambda_
        ),
        "dpo": lambda: fk.FiReMPOLoss.preset("dpo", beta=cfg.beta),
    }[method]()
    visual = loss_fn.gamma > 0
    span = method != "dpo"  # DPO: every response token (EOS included); others: the edit spans
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    rng = _set_seed(seed)
    opt = torch.optim.AdamW(_trainable(model, cfg.freeze), lr=cfg.pref_lr)
    model.train()
    n = len(pt.questions)
    curve = []
    bar = tqdm(range(cfg.pref_steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        idx = rng.choice(n, size=min(cfg.pref_batch, n), replace=False).tolist()
        q = [pt.questions[i] for i in idx]
        im = [pt.images[i] for i in idx]
        ys = [pt.chosen[i] for i in idx] + [pt.rejected[i] for i in idx]
        ws = [pt.chosen_span[i] for i in idx] + [pt.rejected_span[i] for i in idx]
        qs, ims = q + q, im + im
        has = torch.tensor([pt.corrupt[i] is not None for i in idx], dtype=torch.float32)
        if visual:  # (v', y+) and (v', y-); the clean image stands in where no v' exists
            cor = [pt.corrupt[i] if pt.corrupt[i] is not None else pt.images[i] for i in idx]
            ys, ws, qs, ims = ys + ys, ws + ws, qs + qs, ims + cor + cor
        b = dm.make_batch(run.tok, run.n_img, qs, ys, ims, ws if span else None)
        mask = b.weights if span else (b.targets != dm.IGNORE).float()
        st = _states(model, ref, b, mask)
        k = len(idx)
        parts = [
            fk.SequenceStates(*(t[j * k : (j + 1) * k] for t in st)) for j in range(len(ys) // k)
        ]
        w = dm.lm_head_weight(model)
        out = loss_fn(
            w,
            parts[0],
            parts[1],
            *(parts[2:4] if visual else ()),
            has_corrupt=has if visual else None,
            ref_weight=dm.lm_head_weight(ref),
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        margin = (out.chosen_rewards - out.rejected_rewards).mean()
        row = {
            "step": step + 1,
            "loss": float(out.loss.detach()),
            "margin": float(margin.detach()),
            "rank": float(out.rank.detach().mean()),
            "visual": float(out.visual.detach().mean()),
        }
        curve.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}", refresh=False)
    return curve


# ----------------------------------------------------------------------------- report


def _stats(per_seed: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
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


def _plots(out: Path, report: dict, curves: dict, sft_curve: list, samples) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # training curves: SFT loss + test accuracy, preference loss per method (mean over seeds)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    st = [r["step"] for r in sft_curve]
    ax[0].plot(st, [r["loss"] for r in sft_curve], lw=0.8)
    ax[0].set(title="SFT warm-up: loss", xlabel="step", yscale="log")
    ev = [r for r in sft_curve if "closed_accuracy" in r]
    ax[1].plot([r["step"] for r in ev], [r["closed_accuracy"] for r in ev], "o-")
    ax[1].set(title="SFT warm-up: test closed accuracy", xlabel="step", ylim=(0.4, 1.0))
    for m, runs in curves.items():
        arr = np.array([[r["loss"] for r in c] for c in runs])
        x = np.arange(1, arr.shape[1] + 1)
        mean = arr.mean(0)
        k = max(1, len(x) // 30)
        sm = np.convolve(mean, np.ones(k) / k, mode="valid")
        ax[2].plot(x[k - 1 :], sm / max(abs(sm[0]), 1e-8), label=LABELS[REPORT_KEYS[m]])
    ax[2].set(title="preference stage: loss / initial loss", xlabel="step")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=80)
    plt.close(fig)
    files.append("training_curves.png")

    # before/after bars with error bars (std over seeds)
    keys = ["before", "after", "fire_mpo_no_visual", "dpo", "sft_continue"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
    for a, metric in zip(ax, ("closed_accuracy", "grounding_score")):
        means = [report[k][metric] for k in keys]
        errs = [report[k].get(f"{metric}_std", 0.0) for k in keys]
        a.bar(range(len(keys)), means, yerr=errs, capsize=4, color=["0.6", "C3", "C1", "C0", "C2"])
        for i, k in enumerate(keys):
            vals = report[k].get(f"{metric}_per_seed", [report[k][metric]])
            a.plot([i] * len(vals), vals, "k.", ms=4)
        a.set_xticks(range(len(keys)), [LABELS[k] for k in keys], rotation=20, fontsize=8)
        a.set_title(metric.replace("_", " ") + " (mean ± std over seeds; dots: seeds)")
        if metric == "closed_accuracy":
            lo = min(min(report[k].get(f"{metric}_per_seed", [report[k][metric]])) for k in keys)
            a.set_ylim(max(0.0, lo - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(out / "results_bars.png", dpi=80)
    plt.close(fig)
    files.append("results_bars.png")

    # a few example scans with their corrupted copies (the demo's mode and the paper's noise)
    fig, ax = plt.subplots(3, len(samples), figsize=(1.7 * len(samples), 5.4))
    for j, (title, img, rows) in enumerate(samples):
        for i, (name, im) in enumerate([("original", img), *rows]):
            ax[i, j].imshow(im, cmap="gray", vmin=0, vmax=255)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
            if j == 0:
                ax[i, j].set_ylabel(name, fontsize=8)
        ax[0, j].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=80)
    plt.close(fig)
    files.append("examples.png")
    return files


def _samples(raw: list[dd.LesionExample], examples, mode: str, k: int = 6):
    from ..data import open_image
    from ..pairs.corrupt import CorruptConfig, corrupt_image

    picked = [i for i, e in enumerate(raw) if e.has_lesion][:k]
    out = []
    for i in picked:
        ex = examples[i]
        img = open_image(ex.image_path)
        rows = []
        for m in dict.fromkeys((mode, "noise")):
            res = corrupt_image(img, ex, CorruptConfig(mode=m, fallback="skip"))
            rows.append((f"{m}", np.asarray(res.image.convert("L"))))
        out.append((f"{raw[i].label} ({raw[i].qtype})", raw[i].image, rows))
    return out


# ----------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (report.json, plots, data)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI): same code path, ~1 min")
    p.add_argument("--seeds", type=int, default=3, help="seeds per preference method (>= 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..data import write_records
    from ..pairs.corrupt import CorruptConfig
    from ..pairs.editors import ReferenceEditor
    from ..pairs.prepare import prepare_pairs

    if args.seeds < 1:
        raise SystemExit(f"fgpo demo: --seeds must be >= 1, got {args.seeds}")
    t0 = time.time()
    torch.set_flush_denormal(True)  # tiny models hit denormals early: ~20x slower without
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig.quick() if args.quick else DemoConfig.full()
    cfg.seeds = list(range(1, args.seeds + 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ccfg = CorruptConfig(mode=cfg.corrupt_mode, fallback="skip")
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        now = time.time()
        timings[name] = round(now - since, 1)
        return now

    # ---- data
    t = time.time()
    raw = {
        "train": dd.make_dataset(cfg.n_train, cfg.data_seed, contrast=cfg.contrast, prefix="train"),
        "pref": dd.make_dataset(
            cfg.n_pref, cfg.data_seed + 1, contrast=cfg.contrast, prefix="pref"
        ),
        "test": dd.make_dataset(
            cfg.n_test, cfg.data_seed + 2, contrast=cfg.contrast, prefix="test"
        ),
    }
    vqa = {k: dd.write_examples(v, out / "data" / k) for k, v in raw.items()}
    test_set = make_eval_set(vqa["test"], raw["test"], ccfg)
    t = tick("data", t)

    # ---- SFT warm-up (once)
    tok = dm.WordTokenizer(dd.vocabulary())
    model = dm.build_tiny_llava(len(tok), tok.image_token_id, seed=cfg.data_seed)
    run_ = Runner(tok, model.n_image_tokens)
    items = [(e.question, e.answer, e.image) for e in raw["train"]]
    warm = dd.make_dataset(
        cfg.n_train // 3, cfg.data_seed + 3, contrast=cfg.warm_contrast, prefix="warm"
    )
    warm_items = [(e.question, e.answer, e.image) for e in warm]
    sft_curve = train_sft(
        run_,
        model,
        items,
        cfg.sft_steps,
        cfg.sft_batch,
        cfg.sft_lr,
        cfg.data_seed,
        "SFT warm-up",
        on_eval=lambda m: evaluate_model(run_, m, test_set),
        eval_every=cfg.eval_every,
        warm_items=warm_items,
        warm_steps=cfg.warm_steps,
    )
    start_state = copy.deepcopy(model.state_dict())
    before = evaluate_model(run_, model, test_set)
    evidence = evidence_check(run_, model, vqa["test"], raw["test"])
    t = tick("sft", t)

    # ---- prepare: on-policy pairs from the SFT model's greedy answers
    pref_raw = raw["pref"]
    answers = run_.greedy(model, [e.question for e in pref_raw], [e.image for e in pref_raw])
    by_id = {e.id: a for e, a in zip(pref_raw, answers)}
    from collections import Counter

    stats: Counter = Counter()
    records = prepare_pairs(
        vqa["pref"], lambda ex: by_id[ex.id], ReferenceEditor(), ccfg, out / "pairs", stats=stats
    )
    write_records(records, out / "pairs" / "pairs.json")
    pt = encode_pairs(records, tok)
    n_wrong = sum(not r["was_correct"] for r in records)
    t = tick("prepare", t)

    # ---- preference runs and the control, per seed, all from the SFT start
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    curves: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    jobs = [(m, s) for s in cfg.seeds for m in METHODS]
    for m, s in tqdm(jobs, desc="runs (method x seed)", dynamic_ncols=True):
        model.load_state_dict(start_state)
        curve = train_preference(run_, model, pt, m, cfg, seed=1000 * s, desc=f"{m} seed {s}")
        res = evaluate_model(run_, model, test_set)
        res["seed"] = s
        tqdm.write(
            f"{LABELS[REPORT_KEYS[m]]}, seed {s}: closed accuracy {res['closed_accuracy']:.3f} "
            f"(start {before['closed_accuracy']:.3f}), grounding {res['grounding_score']:.2f} "
            f"(start {before['grounding_score']:.2f}), well formed {res['well_formed']:.3f}"
        )
        results[m].append(res)
        curves[m].append(curve)
    t = tick("train_and_eval", t)

    # ---- report
    report: dict[str, Any] = {
        "before": {
            **before,
            "seeds": [cfg.data_seed],
            "closed_accuracy_std": 0.0,
            "grounding_score_std": 0.0,
            "closed_accuracy_per_seed": [before["closed_accuracy"]],
            "grounding_score_per_seed": [before["grounding_score"]],
        },
    }
    for m in METHODS:
        report[REPORT_KEYS[m]] = _stats(results[m], cfg.seeds)
        report[REPORT_KEYS[m]]["per_seed"] = results[m]
    report["verdict"] = verdict(report)
    report["summary"] = report["verdict"]["summary"]
    report["setup"] = {
        "mode": "quick" if args.quick else "full",
        "config": asdict(cfg),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "pairs": len(records),
        "pairs_from_wrong_answers": n_wrong,
        "prepare_stats": dict(stats),
        "sft_start_pref_accuracy": 1.0 - n_wrong / max(1, len(records)),
        "grounding_definition": "mean over test examples with a lesion of log p(answer | v, q) - "
        f"log p(answer | v', q), v' = lesion removed by corrupt mode '{cfg.corrupt_mode}' "
        "(fgpo.evaluate.grounding_score); answer = the ground truth in the model's answer format",
        "evidence_check_sft_start": evidence,
        "threads": torch.get_num_threads(),
        "timings_s": timings,
    }
    plots = _plots(
        out, report, curves, sft_curve, _samples(raw["test"], vqa["test"], cfg.corrupt_mode)
    )
    report["plots"] = plots
    report["curves"] = {"sft": sft_curve, **{m: curves[m] for m in METHODS}}
    timings["total"] = round(time.time() - t0, 1)
    with open(out / "report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(format_table(report))
    print(report["summary"])
    for line in report["verdict"]["details"]:
        print("  " + line)
    print(f"wrote {out / 'report.json'} and {', '.join(plots)} in {timings['total']:.0f} s")
    return 0


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
