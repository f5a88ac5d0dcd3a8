"""The demo's test-split evaluation, through the product's inference and metrics.

- closed accuracy: :func:`fgpo.eval.metrics.score_answers` on greedy answers
  (:func:`fgpo.models.inference.greedy_answers`);
- grounding score: the definition of :func:`fgpo.eval.grounding_score` (mean drop of the
  ground-truth answer's log-prob when the lesion is removed), with the answer written in the
  model's answer format and the corrupted images made once, exactly as ``grounding_score``
  makes them;
- well-formed answers: the share that is exactly one of the answer templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import VQAExample, open_image, synthetic
from ..eval.metrics import score_answers
from ..models.inference import answer_logprobs, greedy_answers
from ..pairs.corrupt import CorruptConfig, corrupt_image

TEMPLATES = frozenset(synthetic.ANSWERS.values())


@dataclass
class EvalSet:
    examples: list[VQAExample]
    images: list[Any]  # PIL images, opened once
    g_idx: list[int]  # examples with a lesion region (grounding)
    g_corrupt: list[Any]  # their lesion-removed images
    max_new_tokens: int = 8

    @classmethod
    def build(cls, examples: list[VQAExample], cfg: CorruptConfig, max_new_tokens: int = 8):
        images = [open_image(ex.image_path) for ex in examples]
        g_idx, g_cor = [], []
        for i, (ex, im) in enumerate(zip(examples, images)):
            res = corrupt_image(im, ex, cfg)
            if res.image is None or res.source == "fallback":
                continue
            g_idx.append(i)
            g_cor.append(res.image)
        return cls(examples, images, g_idx, g_cor, max_new_tokens)

    def template(self, i: int) -> str:
        """The ground-truth answer of example ``i`` in the model's answer format."""
        return self.examples[i].meta["template"]


def evaluate_model(model, proc, es: EvalSet) -> dict[str, Any]:
    """``closed_accuracy``, ``grounding_score`` (nats), ``well_formed`` and the counts."""
    qs = [e.question for e in es.examples]
    preds = greedy_answers(model, proc, es.images, qs, max_new_tokens=es.max_new_tokens)
    acc = score_answers(es.examples, preds)["closed_accuracy"]
    well_formed = float(np.mean([p in TEMPLATES for p in preds])) if preds else float("nan")
    gq = [qs[i] for i in es.g_idx]
    ga = [es.template(i) for i in es.g_idx]
    clean = np.asarray(answer_logprobs(model, proc, [es.images[i] for i in es.g_idx], gq, ga))
    bad = np.asarray(answer_logprobs(model, proc, es.g_corrupt, gq, ga))
    return {
        "closed_accuracy": float(acc),
        "grounding_score": float(np.mean(clean - bad)) if len(clean) else float("nan"),
        "well_formed": well_formed,
        "n_closed": len(es.examples),
        "n_grounding": len(es.g_idx),
    }


def evidence_check(model, proc, es: EvalSet) -> dict[str, Any]:
    """Share of presence questions about scans WITH a lesion that the model answers "present",
    on the clean scan and on its corrupted copies: does a corruption mode remove the evidence?"""
    idx = [
        i
        for i, e in enumerate(es.examples)
        if e.qid == "presence" and e.answer == "yes"  # qid holds the question type
    ]
    out: dict[str, Any] = {"n": len(idx)}
    qs = [es.examples[i].question for i in idx]
    for mode in ("clean", "noise", "blur", "inpaint"):
        if mode == "clean":
            ims = [es.images[i] for i in idx]
        else:
            c = CorruptConfig(mode=mode, fallback="skip")
            ims = [corrupt_image(es.images[i], es.examples[i], c).image for i in idx]
        ans = greedy_answers(model, proc, ims, qs, max_new_tokens=es.max_new_tokens)
        out[f"yes_rate_{mode}"] = float(
            np.mean([synthetic.closed_label("presence", a) == "yes" for a in ans])
        )
    return out
