"""Files the pipeline writes and reads back, made safe against kills and full disks.

- :func:`atomic_write_text`: a reader (or a run killed mid-write) sees the old file or the
  whole new one, never half of it.
- :func:`read_jsonl`: append-only JSON lines (``metrics.jsonl``, ``fgpo prepare``'s
  ``pairs.jsonl``); a kill can cut the last line short, so a partial last line is dropped
  (and reported), while a bad line anywhere else is an error naming it.
- :func:`append_jsonl`: the writer's side: whole lines, one ``write`` per batch, flushed.
- :func:`sha256_file`: a file's identity (checkpoint digests, the training data's).
- :func:`write_error`: an ``OSError`` while writing, re-raised with the path, and for a full
  disk the words "no space left" and how much is free there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TextIO


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and one ``os.replace``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_error(e, path) from e


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a JSON-lines file and whether a partial last line was dropped.

    Only the last line may be cut short (a kill during its ``write``); a bad line before it
    means the file was damaged otherwise: ``ValueError`` naming the file and line.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    rows, dropped = [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):  # the unfinished last line
                dropped = True
                break
            raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i} is a {type(row).__name__}, not an object")
        rows.append(row)
    return rows, dropped


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rewrite_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSON-lines file by ``rows`` atomically (e.g. after dropping a partial line)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(f: TextIO, rows: list[dict[str, Any]], path: str | Path) -> None:
    """Append ``rows`` to the open file ``f`` (of ``path``) as whole lines in one write, then
    flush, so a kill loses at most this batch and never corrupts an earlier line."""
    try:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
    except OSError as e:
        raise write_error(e, path) from e


def write_error(e: OSError, path: str | Path) -> OSError:
    """``e`` as an ``OSError`` naming ``path``; a full disk says "no space left" and how much
    is free on that filesystem, so the user knows where to make room."""
    path = os.fspath(path)
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        where = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        return OSError(
            e.errno, f"no space left on the device while writing {path}{where}: {e.strerror}"
        )
    if getattr(e, "filename", None):
        return e
    return OSError(e.errno, f"writing {path} failed: {e.strerror or e}")


def _free_bytes(path: str) -> int | None:
    d = path
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    try:
        return shutil.disk_usage(d or ".").free
    except OSError:
        return None
