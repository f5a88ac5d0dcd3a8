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

from .errors import DatasetError, MaskTagError
from .files import atomic_write_text

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


# Fields every record needs, as strings; optional path fields are a string or null.
REQUIRED_FIELDS = ("prompt", "chosen", "rejected", "image_path")
OPTIONAL_PATH_FIELDS = ("rejected_image_path",)


def load_records(path: str) -> list[dict[str, Any]]:
    """Read a JSON list (or JSON lines) of preference records and check them (see
    :func:`check_records`). Every error is a :class:`DatasetError` that names the file and the
    line or record."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None
    lines = None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
            ) from None
    else:
        records, lines = _json_lines(path, text)
    return check_records(records, path, lines)


def _json_lines(path: str, text: str) -> tuple[list[Any], list[int]]:
    """Records of a JSON-lines file and the line number of each."""
    try:  # one JSON value over several lines: a pretty-printed object is not JSON lines
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        if not any(key in whole for key in REQUIRED_FIELDS):
            raise DatasetError(
                f"{path}: expected a JSON list of records or JSON lines, got a JSON object with "
                f"keys {sorted(whole)[:10]}"
            )
        if "\n" in text.strip():  # a single record written over several lines
            return [whole], [1]
    records, lines = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}: line {i} is not valid JSON ({e.msg} at column {e.colno}); each line "
                "of a JSON-lines file holds one record"
            ) from None
        lines.append(i)
    return records, lines


def check_records(
    records: Any, source: str = "records", lines: list[int] | None = None
) -> list[dict[str, Any]]:
    """Check the shape of preference records; return them.

    Each record must be an object with the :data:`REQUIRED_FIELDS` as strings, and
    ``rejected_image_path`` a string or null. A wrong type is never guessed at (a null prompt
    would otherwise be trained on as the text "None"): ``DatasetError`` naming ``source``, the
    record (index, JSON-lines line, ``id``) and the field.
    """
    if not isinstance(records, list):
        raise DatasetError(
            f"{source}: expected a JSON list of records, got {type(records).__name__}"
        )
    for k, r in enumerate(records):
        where = f"{source}: record {k}" + (f" (line {lines[k]})" if lines else "")
        if not isinstance(r, dict):
            raise DatasetError(f"{where} is a {type(r).__name__}, not an object")
        where += f" (id={r.get('id')!r})"
        missing = [key for key in REQUIRED_FIELDS if key not in r]
        if missing:
            raise DatasetError(f"{where} lacks {missing}")
        for key in (*REQUIRED_FIELDS, *OPTIONAL_PATH_FIELDS):
            v = r.get(key)
            if not isinstance(v, str) and not (v is None and key in OPTIONAL_PATH_FIELDS):
                want = "a string or null" if key in OPTIONAL_PATH_FIELDS else "a string"
                raise DatasetError(
                    f"{where} field {key!r} must be {want}, got {v!r} ({type(v).__name__})"
                )
    return records


def write_records(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records as one JSON list (UTF-8), creating the folder. Atomic: a reader (or a
    run killed mid-write) sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1, ensure_ascii=False))
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
