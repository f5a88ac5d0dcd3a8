"""Preference records: the JSON format the trainer reads and the ``<mask>`` tags inside it.

A record file is a JSON list (or JSON lines) of objects with ``prompt``, ``chosen`` and
``rejected`` (the differing spans inside ``<mask>…</mask>``), ``image_path``, optional
``rejected_image_path`` (the lesion-corrupted image v'), ``id`` and ``qid`` (the format of the
method's reference implementation); ``fgpo prepare`` adds ``was_correct``, ``answer_type``,
``dataset`` and a few more fields for analysis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MaskTagError

OPEN_TAG = "<mask>"
CLOSE_TAG = "</mask>"


def parse_mask_tags(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove ``<mask>``/``</mask>`` tags; return the clean text and the spans' char ranges.

    >>> parse_mask_tags("the <mask>left</mask> lung")
    ('the left lung', [(4, 8)])

    Raises ``MaskTagError`` for a closing tag without an opening one, an opening tag inside an
    open span (nesting), or a span left open at the end. Empty spans are kept as ``(i, i)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0  # position in the clean text
    i = 0
    start: int | None = None
    while i < len(text):
        if text.startswith(OPEN_TAG, i):
            if start is not None:
                raise MaskTagError(f"nested {OPEN_TAG} at character {i} of {text!r}")
            start = pos
            i += len(OPEN_TAG)
        elif text.startswith(CLOSE_TAG, i):
            if start is None:
                raise MaskTagError(f"{CLOSE_TAG} without {OPEN_TAG} at character {i} of {text!r}")
            spans.append((start, pos))
            start = None
            i += len(CLOSE_TAG)
        else:
            out.append(text[i])
            pos += 1
            i += 1
    if start is not None:
        raise MaskTagError(f"unclosed {OPEN_TAG} (opened at clean character {start}) in {text!r}")
    return "".join(out), spans


def load_records(path: str) -> list[dict[str, Any]]:
    """Read a JSON list (or JSON lines) of preference records; checks the required keys."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for k, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {k} is a {type(r).__name__}, not an object")
        missing = [key for key in ("prompt", "chosen", "rejected", "image_path") if key not in r]
        if missing:
            raise ValueError(f"{path}: record {k} (id={r.get('id')!r}) lacks {missing}")
    return records


def write_records(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records as one JSON list (UTF-8), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    return path


def has_tags(text: str) -> bool:
    """Whether ``text`` holds a ``<mask>`` span."""
    return OPEN_TAG in text and CLOSE_TAG in text


def strip_tags(text: str) -> str:
    """``text`` without its ``<mask>``/``</mask>`` tags."""
    return text.replace(OPEN_TAG, "").replace(CLOSE_TAG, "")


def wrap_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with ``<mask>…</mask>`` around each character span (the inverse of
    :func:`parse_mask_tags`)."""
    out, pos = [], 0
    for s, e in spans:
        out += [text[pos:s], OPEN_TAG, text[s:e], CLOSE_TAG]
        pos = e
    out.append(text[pos:])
    return "".join(out)
