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
AnswersFn = Callable[[Sequence[Any], Sequence[str]], list[str]]
LogprobsFn = Callable[[Sequence[Any], Sequence[str], Sequence[str]], list[float]]
_CHUNK = 64  # examples per call of a batched function (and per progress-bar tick)


@dataclass
class ModelFns:
    """What evaluation needs from a model, one example at a time or batched (either works;
    the batched form wins when both are given):

    - ``answer(example) -> str`` or ``answers(images, questions) -> [str]``: greedy answers;
    - ``logprob(image, question, answer) -> float`` or ``logprobs(images, questions,
      answers) -> [float]``: the summed log-prob of an answer's tokens (grounding score).

    :func:`fgpo.models.inference.model_fns` makes the batched pair from a model.
    """

    answer: Callable[[VQAExample], str] | None = None
    logprob: LogprobFn | None = None
    answers: AnswersFn | None = None
    logprobs: LogprobsFn | None = None

    @classmethod
    def of(cls, fns: ModelFns | Mapping[str, Any] | LogprobFn) -> ModelFns:
        if isinstance(fns, ModelFns):
            return fns
        if callable(fns):  # a bare log-prob function (the grounding score's old signature)
            return cls(logprob=fns)
        unknown = set(fns) - {"answer", "logprob", "answers", "logprobs"}
        if unknown:
            raise ValueError(
                f"model_fns keys must be 'answer', 'logprob', 'answers' or 'logprobs', got "
                f"{sorted(unknown)}"
            )
        return cls(**fns)

    def score_logprobs(self, images, questions, answers) -> list[float]:
        if self.logprobs is not None:
            return [float(x) for x in self.logprobs(images, questions, answers)]
        if self.logprob is None:
            raise ValueError("model_fns has no logprob/logprobs function")
        return [float(self.logprob(i, q, a)) for i, q, a in zip(images, questions, answers)]


def _chunks(n: int, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, _CHUNK)
    return tqdm(starts, desc=desc, leave=False, dynamic_ncols=True, disable=len(starts) < 2)


def grounding_score(
    model_fns: ModelFns | Mapping[str, Any] | LogprobFn,
    examples: Iterable[VQAExample],
    corrupt_cfg: CorruptConfig | None = None,
    *,
    include_fallback: bool = False,
) -> dict[str, Any]:
    """Mean drop of the answer's log-prob (``logprob``/``logprobs`` of ``model_fns``, or a bare
    ``logprob(image, question, answer)`` function) when the lesion is corrupted.

    The corrupted image is made exactly as ``fgpo prepare`` makes it (same mode, same seed from
    the example id). Examples without a lesion region (annotation or segmenter) are left out and
    counted, unless ``include_fallback`` (then the whole-image fallback counts too).
    """
    fns = ModelFns.of(model_fns)
    cfg = corrupt_cfg or CorruptConfig()
    kept: list[tuple[VQAExample, Any, Any, str]] = []
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
        kept.append((ex, image, res.image, res.source))
    per: list[dict[str, Any]] = []
    for s in _chunks(len(kept), "eval: grounding"):
        part = kept[s : s + _CHUNK]
        qs, ans = [k[0].question for k in part], [k[0].answer for k in part]
        clean = fns.score_logprobs([k[1] for k in part], qs, ans)
        bad = fns.score_logprobs([k[2] for k in part], qs, ans)
        for (ex, _, _, source), c, b in zip(part, clean, bad):
            if not (math.isfinite(c) and math.isfinite(b)):
                raise ValueError(f"log-prob function gave a non-finite value for {ex.id}/{ex.qid}")
            per.append(
                {"id": ex.id, "qid": ex.qid, "logp": c, "logp_corrupt": b, "drop": c - b,
                 "source": source}
            )  # fmt: skip
    return {
        "grounding_score": mean([p["drop"] for p in per]),
        "n_grounding": len(per),
        "n_no_lesion_region": n_no_region,
        "n_unreadable_image": n_unreadable,
        "n_corrupt_failed": n_corrupt_failed,
        "corrupt_mode": cfg.mode,
        "per_example": per,
    }


def _answer_all(fns: ModelFns, examples: Sequence[VQAExample]):
    """(answered examples, their answers); unreadable images are counted, not answered."""
    if fns.answers is None:
        scored, preds = [], []
        for ex in examples:
            try:
                preds.append((fns.answer(ex) or "").strip())
                scored.append(ex)
            except DatasetError as e:  # image missing/unreadable: counted, not scored
                log.warning("skipping %s/%s: %s", ex.id, ex.qid, e)
        return scored, preds
    opened = []
    for ex in examples:
        try:
            opened.append((ex, open_image(ex.image_path)))
        except DatasetError as e:
            log.warning("skipping %s/%s: %s", ex.id, ex.qid, e)
    preds = []
    for s in _chunks(len(opened), "eval: answers"):
        part = opened[s : s + _CHUNK]
        got = fns.answers([p[1] for p in part], [p[0].question for p in part])
        preds += [(a or "").strip() for a in got]
    return [p[0] for p in opened], preds


def evaluate(
    model_fns: ModelFns | Mapping[str, Any],
    examples: Sequence[VQAExample],
    *,
    corrupt_cfg: CorruptConfig | None = None,
    grounding: bool = True,
    include_fallback: bool = False,
) -> dict[str, Any]:
    """All metrics for one model: answers (if ``answer(s)``) and grounding (if
    ``logprob(s)``)."""
    fns = ModelFns.of(model_fns)
    has_answer = fns.answer is not None or fns.answers is not None
    has_logprob = fns.logprob is not None or fns.logprobs is not None
    if not (has_answer or has_logprob):
        raise ValueError("model_fns needs an answer function, a logprob function, or both")
    out: dict[str, Any] = {"n_examples": len(examples)}
    if has_answer:
        scored, preds = _answer_all(fns, examples)
        out["n_unanswered"] = len(examples) - len(scored)
        out.update(score_answers(scored, preds))
        out["predictions"] = [
            {"id": ex.id, "qid": ex.qid, "answer": p, "ground_truth": ex.answer}
            for ex, p in zip(scored, preds)
        ]
    if grounding and has_logprob:
        out.update(grounding_score(fns, examples, corrupt_cfg, include_fallback=include_fallback))
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
        from ..models.inference import default_max_new_tokens, load_for_inference, model_fns

        model, proc, device = load_for_inference(args.model, dtype=args.dtype, adapter=args.adapter)
        max_new = args.max_new_tokens or default_max_new_tokens(args.dataset)
        batched = model_fns(model, proc, device, max_new_tokens=max_new)
        if fns.answer is None:
            fns.answers = batched["answers"]
        if not args.no_grounding:
            fns.logprobs = batched["logprobs"]
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
