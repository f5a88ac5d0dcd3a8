"""``fgpo eval``: answer metrics (:mod:`.metrics`) and the grounding score for one model.

Grounding score: mean over examples with a lesion region of
``log p(answer | v, q) - log p(answer | v', q)``, the drop of the summed log-prob of the
ground-truth answer when the lesion is corrupted (v' made exactly as ``fgpo prepare`` makes it).
Higher means the answer rests on the visual evidence; ~0 means the model ignores the lesion.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import LOADERS, DatasetError, VQAExample, load_dataset, open_image
from ..pairs.corrupt import MODES, CorruptConfig, corrupt_image, load_segmenter
from .metrics import mean, score_answers

log = logging.getLogger(__name__)

LogprobFn = Callable[[Any, str, str], float]


@dataclass
class ModelFns:
    """What evaluation needs from a model: greedy ``answer(example) -> str`` and, for the
    grounding score, ``logprob(image, question, answer) -> float`` (summed over answer tokens)."""

    answer: Callable[[VQAExample], str] | None = None
    logprob: LogprobFn | None = None


def grounding_score(
    logprob_fn: LogprobFn,
    examples: Iterable[VQAExample],
    corrupt_cfg: CorruptConfig | None = None,
    *,
    include_fallback: bool = False,
) -> dict[str, Any]:
    """Mean drop of ``logprob_fn(image, question, answer)`` when the lesion is corrupted.

    The corrupted image is made exactly as ``fgpo prepare`` makes it (same mode, same seed from
    the example id). Examples without a lesion region (annotation or segmenter) are left out and
    counted, unless ``include_fallback`` (then the whole-image fallback counts too).
    """
    cfg = corrupt_cfg or CorruptConfig()
    drops: list[float] = []
    per: list[dict[str, Any]] = []
    n_no_region = n_unreadable = n_corrupt_failed = 0
    for ex in examples:
        try:
            image = open_image(ex.image_path)
        except DatasetError as e:
            n_unreadable += 1
            log.warning("grounding: skipping %s/%s: %s", ex.id, ex.qid, e)
            continue
        try:
            res = corrupt_image(image, ex, cfg)
        except (OSError, ValueError) as e:  # e.g. an unreadable mask image or a bad box
            n_corrupt_failed += 1
            log.warning("grounding: no corrupted image for %s/%s: %s", ex.id, ex.qid, e)
            continue
        if res.image is None or (res.source == "fallback" and not include_fallback):
            n_no_region += 1
            continue
        clean = float(logprob_fn(image, ex.question, ex.answer))
        bad = float(logprob_fn(res.image, ex.question, ex.answer))
        if not (math.isfinite(clean) and math.isfinite(bad)):
            raise ValueError(f"logprob_fn returned a non-finite value for {ex.id}/{ex.qid}")
        drops.append(clean - bad)
        per.append(
            {
                "id": ex.id,
                "qid": ex.qid,
                "logp": clean,
                "logp_corrupt": bad,
                "drop": clean - bad,
                "source": res.source,
            }
        )
    return {
        "grounding_score": mean(drops),
        "n_grounding": len(drops),
        "n_no_lesion_region": n_no_region,
        "n_unreadable_image": n_unreadable,
        "n_corrupt_failed": n_corrupt_failed,
        "corrupt_mode": cfg.mode,
        "per_example": per,
    }


def evaluate(
    model_fns: ModelFns | Mapping[str, Any],
    examples: Sequence[VQAExample],
    *,
    corrupt_cfg: CorruptConfig | None = None,
    grounding: bool = True,
    include_fallback: bool = False,
) -> dict[str, Any]:
    """All metrics for one model: answers (if ``answer``) and grounding (if ``logprob``)."""
    if isinstance(model_fns, Mapping):
        unknown = set(model_fns) - {"answer", "logprob"}
        if unknown:
            raise ValueError(f"model_fns keys must be 'answer'/'logprob', got {sorted(unknown)}")
        model_fns = ModelFns(**model_fns)
    if model_fns.answer is None and model_fns.logprob is None:
        raise ValueError("model_fns needs an answer function, a logprob function, or both")
    out: dict[str, Any] = {"n_examples": len(examples)}
    if model_fns.answer is not None:
        scored, preds = [], []
        for ex in examples:
            try:
                preds.append((model_fns.answer(ex) or "").strip())
                scored.append(ex)
            except DatasetError as e:  # image missing/unreadable: counted, not scored
                log.warning("skipping %s/%s: %s", ex.id, ex.qid, e)
        out["n_unanswered"] = len(examples) - len(scored)
        out.update(score_answers(scored, preds))
        out["predictions"] = [
            {"id": ex.id, "qid": ex.qid, "answer": p, "ground_truth": ex.answer}
            for ex, p in zip(scored, preds)
        ]
    if grounding and model_fns.logprob is not None:
        g = grounding_score(
            model_fns.logprob, examples, corrupt_cfg, include_fallback=include_fallback
        )
        out.update(g)
    return out


# ----------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, choices=sorted(LOADERS))
    p.add_argument("--root", required=True, help="the dataset folder in its official layout")
    p.add_argument("--split", default=None, help="e.g. test (dataset-specific)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N examples")
    p.add_argument("--model", help="HF id/dir or tiny-* (fgpo.models.load_model)")
    p.add_argument("--adapter", help="a PEFT adapter folder to load on top of --model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 (160 for reports)")
    p.add_argument("--predictions", help="JSON list of {id, qid, answer}: score these instead")
    p.add_argument("--no-grounding", action="store_true", help="skip the grounding score")
    p.add_argument("--corrupt-mode", choices=MODES, default="noise")
    p.add_argument("--noise-std", type=float, default=45.0)
    p.add_argument("--segmenter", help="module:function, as for fgpo prepare")
    p.add_argument(
        "--include-fallback",
        action="store_true",
        help="grounding also over examples without a lesion region (whole image)",
    )
    p.add_argument("--out", help="write the metrics JSON here (default: print only)")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.model or args.predictions):
        raise SystemExit("fgpo eval: give --model and/or --predictions")
    split = args.split or "test"
    examples, report = load_dataset(args.dataset, args.root, split)
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise SystemExit(f"fgpo eval: no usable examples ({report.summary()})")
    fns = ModelFns()
    if args.predictions:
        with open(args.predictions, encoding="utf-8") as f:
            table = {(str(r["id"]), str(r.get("qid", ""))): str(r["answer"]) for r in json.load(f)}
        missing = [(ex.id, ex.qid) for ex in examples if (ex.id, ex.qid) not in table]
        if missing:
            raise SystemExit(
                f"fgpo eval: --predictions lacks {len(missing)} examples, "
                f"e.g. id={missing[0][0]} qid={missing[0][1]}"
            )
        fns.answer = lambda ex: table[(ex.id, ex.qid)]
    if args.model:
        from ..models.inference import (
            answer_logprob_fn,
            default_max_new_tokens,
            greedy_answer_fn,
            load_for_inference,
        )

        model, proc, device = load_for_inference(args.model, dtype=args.dtype, adapter=args.adapter)
        if fns.answer is None:
            max_new = args.max_new_tokens or default_max_new_tokens(args.dataset)
            fns.answer = greedy_answer_fn(model, proc, device, max_new_tokens=max_new)
        if not args.no_grounding:
            fns.logprob = answer_logprob_fn(model, proc, device)
    seg = load_segmenter(args.segmenter) if args.segmenter else None
    cfg = CorruptConfig(mode=args.corrupt_mode, noise_std=args.noise_std, segmenter=seg)
    metrics = evaluate(
        fns,
        examples,
        corrupt_cfg=cfg,
        grounding=not args.no_grounding,
        include_fallback=args.include_fallback,
    )
    metrics["dataset"] = report.to_dict()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=1)
    short = {k: v for k, v in metrics.items() if k not in ("predictions", "per_example", "dataset")}
    print(report.summary())
    print(json.dumps(short, indent=1))
    return 0
