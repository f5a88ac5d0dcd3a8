"""Editors: turn the model's greedy answer ``y-`` into a minimal-edit preference pair.

An :class:`Editor` gets an example (with its ground truth) and the model's answer, and returns an
:class:`Edit`: ``chosen`` (y+) and ``rejected`` (y-), both with ``<mask>…</mask>`` around the
spans in which they differ. When the model was wrong, y- is its answer and y+ the same text with
only the wrong span replaced; when it was right, y+ is its answer and y- a minimal
counterfactual. Editors raise :class:`SkipExample` (with a reason) when they cannot make a pair.

The tags are always computed here, by :func:`tag_diff` (a word-level minimal diff), never taken
from an LLM: the trainer's span mask must match the two texts exactly.

- :class:`ReferenceEditor`: rules + the ground truth; closed questions (yes/no, "A or B"
  options) and short open answers; no model needed.
- :class:`fgpo.pairs.llm.LLMEditor`: any OpenAI-compatible ``/chat/completions`` endpoint
  (urllib only): base URL, model name, API key from an environment variable; bounded retries.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..data.errors import SkipExample
from .text import (
    NO_WORDS,
    YES_WORDS,
    contains_phrase,
    find_phrase,
    match_case,
    normalize,
    polarity,
    tag_diff,
    tokens,
)

_STOP = set(
    "a an the is are was were be been being of in on at to for with and or this that these those "
    "it its there here image picture scan shows show shown showing seen see can could does do "
    "which what where how many much who whom whose why when as by from into within than then "
    "appears appear seems seem visible likely most probably i we you they he she".split()
)


@dataclass
class Edit:
    chosen: str
    rejected: str
    was_correct: bool
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Editor(Protocol):
    name: str

    def edit(self, example: Any, model_answer: str) -> Edit: ...


def _replace(text: str, span: tuple[int, int], new: str) -> str:
    s, e = span
    return text[:s] + match_case(new, text[s:e]) + text[e:]


@dataclass
class ReferenceEditor:
    """Minimal edits from the ground truth, no model.

    - yes/no questions: the first yes/no word of the answer is flipped (and a negation right
      after it, "no"/"not", follows it); an answer with no such word that is short is replaced.
    - "A or B" questions (``example.options``): the option the answer names is swapped.
    - open questions, short answers: the model's answer span (the words that are not from the
      question, or the whole answer when it is short) is replaced by the ground truth.
      Counterfactuals for right answers come from ``distractors`` (other ground-truth answers,
      e.g. of the dataset; :meth:`from_examples` collects them) chosen by a seed from the id.
    - reports: not handled (use :class:`LLMEditor`): :class:`SkipExample`.
    """

    distractors: Sequence[str] = ()
    max_short_words: int = 6
    name: str = "reference"

    @classmethod
    def from_examples(cls, examples: Iterable[Any], **kw) -> ReferenceEditor:
        seen: dict[str, str] = {}
        for ex in examples:
            if getattr(ex, "answer_type", "open") == "open" and ex.answer.strip():
                seen.setdefault(normalize(ex.answer), ex.answer.strip())
        return cls(distractors=sorted(seen.values()), **kw)

    def edit(self, example: Any, model_answer: str) -> Edit:
        y = model_answer.strip()
        if not y:
            raise SkipExample("empty_answer", str(example.id))
        atype = getattr(example, "answer_type", "open")
        if atype == "report":
            raise SkipExample("report_needs_llm_editor", str(example.id))
        gt = str(example.answer).strip()
        if normalize(gt) in YES_WORDS | NO_WORDS:  # yes/no, whatever the dataset calls it
            return self._yes_no(example, y, polarity(gt))
        if getattr(example, "options", None) and any(
            contains_phrase(gt, o) for o in example.options
        ):
            return self._options(example, y, gt)
        return self._open(example, y, gt)

    def _pair(self, model: str, other: str, correct: bool, how: str) -> Edit:
        if normalize(model) == normalize(other):
            raise SkipExample("no_difference", model)
        chosen, rejected = (model, other) if correct else (other, model)
        c, r = tag_diff(chosen, rejected)
        return Edit(c, r, correct, {"edit": how})

    def _yes_no(self, example: Any, y: str, gt_pol: str) -> Edit:
        pol = polarity(y)
        if pol is None:
            if len(tokens(y)) > self.max_short_words:
                raise SkipExample("cannot_locate_answer", y[:80])
            return self._pair(y, gt_pol.capitalize(), False, "replace_short")
        correct = pol == gt_pol
        target = "no" if (pol == "yes") else "yes"
        return self._pair(y, _flip_polarity(y, target), correct, "flip_yes_no")

    def _options(self, example: Any, y: str, gt: str) -> Edit:
        opts = list(example.options)
        named = [o for o in opts if contains_phrase(y, o)]
        right = next(o for o in opts if contains_phrase(gt, o))
        if len(named) == 1:
            span = find_phrase(y, named[0])
            correct = normalize(named[0]) == normalize(right)
            other = next((o for o in opts if normalize(o) != normalize(named[0])), None)
            new = other if correct else right
            if other is None or span is None:
                raise SkipExample("cannot_locate_answer", y[:80])
            return self._pair(y, _replace(y, span, new), correct, "swap_option")
        if len(tokens(y)) <= self.max_short_words and not named:
            return self._pair(y, right, False, "replace_short")
        raise SkipExample("cannot_locate_answer", y[:80])

    def _answer_span(self, example: Any, y: str) -> tuple[int, int] | None:
        tt = tokens(y)
        if len(tt) <= 3:
            return (tt[0][1], tt[-1][2]) if tt else None
        qwords = {t for t, _, _ in tokens(example.question)}
        content = [t not in qwords and t not in _STOP for t, _, _ in tt]
        best, cur = None, None
        for i, c in enumerate(content):
            if c:
                cur = (cur[0], i) if cur is not None else (i, i)
                if best is None or cur[1] - cur[0] > best[1] - best[0]:
                    best = cur
            else:
                cur = None
        if best is None:
            return None
        return tt[best[0]][1], tt[best[1]][2]

    def _open(self, example: Any, y: str, gt: str) -> Edit:
        if contains_phrase(y, gt):  # right: counterfactual from the distractors
            pool = [d for d in self.distractors if normalize(d) != normalize(gt)]
            if not pool:
                raise SkipExample("no_distractor", gt)
            rnd = random.Random(f"{example.id}|{example.qid}")
            new = pool[rnd.randrange(len(pool))]
            span = find_phrase(y, gt)
            return self._pair(y, _replace(y, span, new), True, "counterfactual")
        if len(tokens(gt)) > self.max_short_words:
            raise SkipExample("answer_too_long", gt[:80])
        span = self._answer_span(example, y)
        if span is None:
            raise SkipExample("cannot_locate_answer", y[:80])
        return self._pair(y, _replace(y, span, gt), False, "replace_span")


def _flip_polarity(text: str, target: str) -> str:
    """Flip the first yes/no word to ``target`` and keep the sentence coherent for the common
    forms "Yes, there is X" <-> "No, there is no X" and "... is seen" <-> "... is not seen"."""
    tt = tokens(text)
    i = next(k for k, (t, _, _) in enumerate(tt) if t in YES_WORDS | NO_WORDS)
    word = tt[i][0]
    if word == "not" and target == "yes":  # "... is not enlarged" -> "... is enlarged"
        s = tt[i][1]
        e = tt[i][2]
        while e < len(text) and text[e] == " ":
            e += 1
        return text[:s] + text[e:]
    if word == "none":
        return _replace(text, (tt[i][1], tt[i][2]), "some")
    new = target if word in ("yes", "no", "yeah", "yep", "nope") else _OPPOSITE.get(word, target)
    out = _replace(text, (tt[i][1], tt[i][2]), new)
    if word in ("yes", "no", "yeah", "yep", "nope") and len(tt) > i + 1:
        rest = tokens(out)
        j = next(
            (k for k in range(i + 1, len(rest)) if rest[k][0] in ("no", "not", "a", "an")), None
        )
        if j is not None and rest[j][0] in ("no", "not") and target == "yes":
            s, e = rest[j][1], rest[j][2]
            rep = "a" if rest[j][0] == "no" else ""
            if rep:
                out = out[:s] + rep + out[e:]
            else:
                while e < len(out) and out[e] == " ":
                    e += 1
                out = out[:s] + out[e:]
        elif j is not None and rest[j][0] in ("a", "an") and target == "no":
            out = out[: rest[j][1]] + "no" + out[rest[j][2] :]
    return out


_OPPOSITE = {
    "true": "false",
    "false": "true",
    "correct": "incorrect",
    "incorrect": "correct",
    "present": "absent",
    "absent": "present",
    "positive": "negative",
    "negative": "positive",
}
