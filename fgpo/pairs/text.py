"""Word-level text tools shared by the editors and the metrics: tokens, minimal diffs, the
``<mask>`` tagging of differing spans, normalisation and yes/no polarity of answers."""

from __future__ import annotations

import difflib
import re

from ..data.records import wrap_spans

# Decimal numbers (3.5) and alphanumeric words (T2, x-ray, don't); punctuation and
# whitespace are not tokens, so "Yes." vs "No" differs only in the word.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:[-'][^\W_]+)*", re.UNICODE)

YES_WORDS = {"yes", "yeah", "yep", "true", "correct", "present", "positive"}
NO_WORDS = {"no", "nope", "false", "incorrect", "absent", "negative", "not", "none"}


def tokens(text: str) -> list[tuple[str, int, int]]:
    """(lowercased token, start, end) for the words/numbers of ``text``."""
    return [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


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
    return wrap_spans(a, sa), wrap_spans(b, sb)


def change_ratio(a: str, b: str) -> float:
    """Share of the words of the longer text that are inside a differing span (0 = same)."""
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 0.0
    sm = difflib.SequenceMatcher(a=[t[0] for t in ta], b=[t[0] for t in tb], autojunk=False)
    same = sum(bl.size for bl in sm.get_matching_blocks())
    return 1.0 - same / max(len(ta), len(tb))


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


def find_phrase(text: str, phrase: str) -> tuple[int, int] | None:
    """Character span of the first whole-word occurrence of ``phrase`` in ``text``."""
    tt = tokens(text)
    tp = [t for t, _, _ in tokens(phrase)]
    n = len(tp)
    for i in range(len(tt) - n + 1 if n else 0):
        if [t for t, _, _ in tt[i : i + n]] == tp:
            return tt[i][1], tt[i + n - 1][2]
    return None


def match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    if like[:1].islower() and word[:1].isupper() and not word[:2].isupper():
        return word[:1].lower() + word[1:]  # "Liver" -> "liver" mid-sentence; "CT" stays
    return word
