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
- :class:`LLMEditor`: any OpenAI-compatible ``/chat/completions`` endpoint (urllib only): base
  URL, model name, API key from an environment variable; our own prompt; bounded retries.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

MASK_OPEN, MASK_CLOSE = "<mask>", "</mask>"

# Decimal numbers (3.5) and alphanumeric words (T2, x-ray, don't); punctuation and
# whitespace are not tokens, so "Yes." vs "No" differs only in the word.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:[-'][^\W_]+)*", re.UNICODE)

YES_WORDS = {"yes", "yeah", "yep", "true", "correct", "present", "positive"}
NO_WORDS = {"no", "nope", "false", "incorrect", "absent", "negative", "not", "none"}
_STOP = set(
    "a an the is are was were be been being of in on at to for with and or this that these those "
    "it its there here image picture scan shows show shown showing seen see can could does do "
    "which what where how many much who whom whose why when as by from into within than then "
    "appears appear seems seem visible likely most probably i we you they he she".split()
)


class SkipExample(Exception):
    """The editor cannot make a pair for this example; ``reason`` is counted by the caller."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class LLMEditorError(RuntimeError):
    """The LLM endpoint failed (after the retries) or answered something unusable."""


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


# ----------------------------------------------------------------------------- tagging


def tokens(text: str) -> list[tuple[str, int, int]]:
    """(lowercased token, start, end) for the words/numbers of ``text``."""
    return [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _wrap(text: str, spans: Iterable[tuple[int, int]]) -> str:
    out, pos = [], 0
    for s, e in spans:
        out += [text[pos:s], MASK_OPEN, text[s:e], MASK_CLOSE]
        pos = e
    out.append(text[pos:])
    return "".join(out)


def diff_spans(a: str, b: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Character spans of the words that differ between ``a`` and ``b`` (case-insensitive,
    punctuation ignored), from a word-level longest-matching-block diff."""
    ta, tb = tokens(a), tokens(b)
    sm = difflib.SequenceMatcher(a=[t[0] for t in ta], b=[t[0] for t in tb], autojunk=False)
    ra, rb = [], []
    for op, i0, i1, j0, j1 in sm.get_opcodes():
        if op == "equal":
            continue
        if i0 == i1 or j0 == j1:
            # A pure insertion would leave one side with no tagged word (an empty span mask):
            # take the next word (else the previous one) into the span on both sides.
            if i1 < len(ta) and j1 < len(tb):
                i1, j1 = i1 + 1, j1 + 1
            elif i0 > 0 and j0 > 0:
                i0, j0 = i0 - 1, j0 - 1
        ra.append((i0, i1))
        rb.append((j0, j1))
    return _spans(ta, ra), _spans(tb, rb)


def _spans(tt: list, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges -> merged character spans (ranges that touch or overlap become one)."""
    merged: list[list[int]] = []
    for i0, i1 in ranges:
        if i1 <= i0:
            continue
        if merged and i0 <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], i1)
        else:
            merged.append([i0, i1])
    return [(tt[i0][1], tt[i1 - 1][2]) for i0, i1 in merged]


def tag_diff(a: str, b: str) -> tuple[str, str]:
    """``a`` and ``b`` with ``<mask>…</mask>`` around the word spans in which they differ.

    >>> tag_diff("Yes, it is a cyst.", "No, it is no cyst.")
    ('<mask>Yes</mask>, it is <mask>a</mask> cyst.', '<mask>No</mask>, it is <mask>no</mask> cyst.')

    A pure insertion also tags the next word on both sides, so neither side's mask is empty.
    """
    sa, sb = diff_spans(a, b)
    return _wrap(a, sa), _wrap(b, sb)


def has_tags(text: str) -> bool:
    return MASK_OPEN in text and MASK_CLOSE in text


def strip_tags(text: str) -> str:
    return text.replace(MASK_OPEN, "").replace(MASK_CLOSE, "")


def change_ratio(a: str, b: str) -> float:
    """Share of the words of the longer text that are inside a differing span (0 = same)."""
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 0.0
    sm = difflib.SequenceMatcher(a=[t[0] for t in ta], b=[t[0] for t in tb], autojunk=False)
    same = sum(bl.size for bl in sm.get_matching_blocks())
    return 1.0 - same / max(len(ta), len(tb))


# ----------------------------------------------------------------------------- judging


def normalize(text: str) -> str:
    """Lowercase words/numbers joined by single spaces, articles dropped."""
    return " ".join(t for t, _, _ in tokens(text) if t not in ("a", "an", "the"))


def polarity(text: str) -> str | None:
    """ "yes"/"no" from the first yes/no-like word of an answer, else None."""
    for t, _, _ in tokens(text):
        if t in YES_WORDS:
            return "yes"
        if t in NO_WORDS:
            return "no"
    return None


def contains_phrase(text: str, phrase: str) -> bool:
    """Whole-word, case-insensitive containment of ``phrase`` in ``text``."""
    p = normalize(phrase)
    return bool(p) and f" {p} " in f" {normalize(text)} "


def _find_phrase(text: str, phrase: str) -> tuple[int, int] | None:
    """Character span of the first whole-word occurrence of ``phrase`` in ``text``."""
    tt = tokens(text)
    tp = [t for t, _, _ in tokens(phrase)]
    n = len(tp)
    for i in range(len(tt) - n + 1 if n else 0):
        if [t for t, _, _ in tt[i : i + n]] == tp:
            return tt[i][1], tt[i + n - 1][2]
    return None


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    if like[:1].islower() and word[:1].isupper() and not word[:2].isupper():
        return word[:1].lower() + word[1:]  # "Liver" -> "liver" mid-sentence; "CT" stays
    return word


def _replace(text: str, span: tuple[int, int], new: str) -> str:
    s, e = span
    return text[:s] + _match_case(new, text[s:e]) + text[e:]


# ----------------------------------------------------------------------------- reference editor


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
            span = _find_phrase(y, named[0])
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
            span = _find_phrase(y, gt)
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


# ----------------------------------------------------------------------------- LLM editor

SYSTEM_PROMPT = (
    "You edit answers of a medical vision-language model to build preference pairs. You never "
    "rewrite style: you change as few words as possible. Reply with one JSON object only."
)

USER_PROMPT = """Question: {question}
Ground-truth answer: {answer}
Model answer: {model_answer}

1. Decide whether the model answer is medically correct given the ground truth ("is_correct").
2. If it is wrong: copy the model answer and replace only the wrong words by the correct ones
   ("edited"). Keep every other word, the order and the punctuation.
3. If it is right: copy the model answer and change only the key words so that it becomes a
   plausible but wrong answer ("edited"), e.g. yes <-> no, left <-> right, one organ for another.
4. For a report, edit only the sentences that contradict the ground truth (or, if it is right,
   make one finding wrong); leave every other sentence exactly as it is.

Reply with JSON only: {{"is_correct": true or false, "edited": "..."}}"""


def _extract_json(content: str) -> dict:
    text = content.strip()
    if text.startswith("```"):
        text = re.sub(r"^```(?:json)?\s*", "", text)
        text = re.sub(r"\s*```$", "", text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        m = re.search(r"\{.*\}", text, re.S)
        if not m:
            raise
        obj = json.loads(m.group())
    if not isinstance(obj, dict):
        raise json.JSONDecodeError("expected a JSON object", text, 0)
    return obj


@dataclass
class LLMEditor:
    """Editor over an OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``).

    ``base_url`` e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``; the API key
    is read from the environment variable ``api_key_env`` (None or "" sends no key: local
    servers). Transient failures (connection errors, HTTP 429/5xx, unparseable replies) are
    retried ``max_retries`` times with exponential backoff; other HTTP errors (401, 404, ...)
    raise :class:`LLMEditorError` at once. An edit that changes more than ``max_change_ratio``
    of the words is not minimal: :class:`SkipExample`.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 2
    backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 512
    max_change_ratio: float = 0.5
    name: str = "llm"

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url or ""):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        self._key = None
        if self.api_key_env:
            self._key = os.environ.get(self.api_key_env)
            if not self._key:
                raise ValueError(
                    f"the API key environment variable {self.api_key_env} is not set "
                    "(pass api_key_env=None for a server without authentication)"
                )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if host in ("localhost", "::1") or host.startswith("127."):
            # a local server is never reached through an http_proxy from the environment
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        else:
            opener = urllib.request.build_opener()
        with opener.open(req, timeout=self.timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def complete(self, messages: list[dict]) -> dict:
        """One chat completion, parsed as a JSON object, with the retry policy above."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                body = self._post(payload)
                content = body["choices"][0]["message"]["content"]
                return _extract_json(content or "")
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code != 429 and e.code < 500:
                    raise LLMEditorError(f"{self.url}: {last}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"connection failed: {e}"
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
                last = f"malformed reply ({type(e).__name__}: {e})"
        raise LLMEditorError(f"{self.url}: {self.max_retries + 1} attempts failed; last: {last}")

    def messages(self, example: Any, model_answer: str) -> list[dict]:
        user = USER_PROMPT.format(
            question=example.question, answer=example.answer, model_answer=model_answer
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def edit(self, example: Any, model_answer: str) -> Edit:
        y = model_answer.strip()
        if not y:
            raise SkipExample("empty_answer", str(example.id))
        obj = self.complete(self.messages(example, y))
        correct = obj.get("is_correct")
        if isinstance(correct, str):
            correct = correct.strip().lower() in ("true", "yes", "1")
        edited = obj.get("edited")
        if not isinstance(correct, bool) or not isinstance(edited, str):
            raise SkipExample("llm_reply_missing_fields", json.dumps(obj)[:200])
        edited = strip_tags(edited).strip()
        if normalize(edited) == normalize(y):
            raise SkipExample("no_difference", y[:80])
        ratio = change_ratio(y, edited)
        if len(tokens(y)) > 3 and ratio > self.max_change_ratio:
            raise SkipExample("edit_not_minimal", f"{ratio:.2f} of the words changed")
        chosen, rejected = (y, edited) if correct else (edited, y)
        c, r = tag_diff(chosen, rejected)
        return Edit(c, r, correct, {"edit": "llm", "change_ratio": round(ratio, 3)})
