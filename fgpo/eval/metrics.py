"""Answer metrics (answers normalized: lower case, words and numbers only, articles dropped).

- closed accuracy: yes/no questions compare the answer's polarity (its first yes/no-like word:
  "yes", "no", "not", "absent", ...) with the ground truth's; "A or B" questions need the
  answer to name exactly the right option; other closed answers need the ground truth as a
  whole-word phrase in the answer.
- open exact match: normalized answer == normalized ground truth.
- open recall: share of the ground truth's words found in the answer (multiset), as in
  LLaVA-Med's open-question recall.
- token F1 (reports): SQuAD-style bag-of-words F1 between generated and reference report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..data import VQAExample
from ..pairs.text import NO_WORDS, YES_WORDS, contains_phrase, normalize, polarity, tokens


def closed_correct(pred: str, gt: str, options: Sequence[str] = ()) -> bool:
    """Whether a closed-question answer is right (see the module docstring)."""
    if normalize(gt) in YES_WORDS | NO_WORDS:
        p = polarity(pred)
        return p is not None and p == polarity(gt)
    if options and any(contains_phrase(gt, o) for o in options):
        named = {normalize(o) for o in options if contains_phrase(pred, o)}
        right = {normalize(o) for o in options if contains_phrase(gt, o)}
        return named == right
    return contains_phrase(pred, gt)


def exact_match(pred: str, gt: str) -> bool:
    return normalize(pred) == normalize(gt)


def answer_recall(pred: str, gt: str) -> float:
    """Share of the ground truth's words (multiset) that appear in the prediction."""
    g = Counter(t for t, _, _ in tokens(gt))
    if not g:
        return 0.0
    p = Counter(t for t, _, _ in tokens(pred))
    return sum((g & p).values()) / sum(g.values())


def token_f1(pred: str, gt: str) -> float:
    """Bag-of-words F1 (SQuAD-style) between prediction and reference."""
    p = Counter(t for t, _, _ in tokens(pred))
    g = Counter(t for t, _, _ in tokens(gt))
    if not p or not g:
        return float(p == g)
    common = sum((p & g).values())
    if common == 0:
        return 0.0
    prec, rec = common / sum(p.values()), common / sum(g.values())
    return 2 * prec * rec / (prec + rec)


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_answers(examples: Sequence[VQAExample], preds: Sequence[str]) -> dict[str, Any]:
    """Accuracy metrics for predictions aligned with ``examples``; None where a kind is absent."""
    if len(examples) != len(preds):
        raise ValueError(f"{len(examples)} examples but {len(preds)} predictions")
    closed, em, rec, f1 = [], [], [], []
    for ex, p in zip(examples, preds):
        if ex.answer_type == "closed":
            closed.append(float(closed_correct(p, ex.answer, ex.options)))
        elif ex.answer_type == "open":
            em.append(float(exact_match(p, ex.answer)))
            rec.append(answer_recall(p, ex.answer))
        else:
            f1.append(token_f1(p, ex.answer))
    return {
        "closed_accuracy": mean(closed),
        "n_closed": len(closed),
        "open_exact_match": mean(em),
        "open_recall": mean(rec),
        "n_open": len(em),
        "report_token_f1": mean(f1),
        "n_report": len(f1),
    }
