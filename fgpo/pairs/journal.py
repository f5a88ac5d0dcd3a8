"""The progress journal of ``fgpo prepare``: every example's outcome on disk as soon as it is
known, so a failure (an endpoint that goes down, a missing answer, Ctrl-C, a kill) loses at
most the example in progress, and ``--resume`` continues without redoing (or paying for) the
done ones.

``OUT/prepare_progress.jsonl`` holds one line per processed example: ``key`` (id, qid), the
``stats`` it added and, for a pair, its ``record``. Each line is written whole and flushed; a
line cut short by a kill is dropped when the journal is read back (that example is redone).
``pairs.json`` (the trainer's input) and ``prepare_report.json`` are written from the journal
when the run ends, completed or not.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..data import write_records
from ..data.files import append_jsonl, atomic_write_text, read_jsonl, rewrite_jsonl, write_error

JOURNAL = "prepare_progress.jsonl"
OUTPUTS = (JOURNAL, "pairs.json", "prepare_report.json")


class PairJournal:
    """Append-only outcomes of one ``fgpo prepare`` output folder.

    ``resume=False`` refuses a folder that holds another run's outputs (nothing is overwritten
    silently); ``resume=True`` reads the journal back: :meth:`done` says which examples to
    skip, and :attr:`stats`, :attr:`records` and the dedup keys include the earlier work.
    """

    def __init__(self, out_dir: str | Path, *, resume: bool) -> None:
        self.out = Path(out_dir)
        self.path = self.out / JOURNAL
        found = [n for n in OUTPUTS if (self.out / n).exists()]
        if found and not resume:
            raise FileExistsError(
                f"{self.out} holds the output of an earlier prepare run ({', '.join(found)}): "
                "pass --resume to continue it, or choose another --out"
            )
        self.stats: Counter = Counter()
        self.records: list[dict[str, Any]] = []
        self.seen: set[tuple] = set()  # (id, qid, chosen, rejected) of the pairs made
        self._done: Counter = Counter()  # (id, qid) -> examples processed
        self.resumed = 0
        if resume and self.path.exists():
            rows, partial = read_jsonl(self.path)
            if partial:  # a kill cut the last line short: that example is redone
                rewrite_jsonl(self.path, rows)
            for row in rows:
                self._count(row)
                self._done[tuple(row["key"])] += 1
            self.resumed = len(rows)
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(e, self.path) from e

    def _count(self, row: dict[str, Any]) -> None:
        self.stats.update(row["stats"])
        rec = row.get("record")
        if rec is not None:
            self.records.append(rec)
            self.seen.add((rec["id"], rec["qid"], rec["chosen"], rec["rejected"]))

    def done(self, key: tuple[str, str]) -> bool:
        """Whether an example with this (id, qid) was processed before; each call consumes one
        (a dataset may hold the same key twice)."""
        if self._done[key] > 0:
            self._done[key] -= 1
            return True
        return False

    def add(self, key: tuple[str, str], stats: Counter, record: dict[str, Any] | None) -> None:
        """One example's outcome: on disk before anything else happens."""
        row: dict[str, Any] = {"key": list(key), "stats": dict(stats)}
        if record is not None:
            row["record"] = record
        append_jsonl(self._file, [row], self.path)
        self._count(row)

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write ``pairs.json`` and ``prepare_report.json`` (``summary`` + the counts) from
        everything done so far; returns the path of ``pairs.json``."""
        self._file.flush()
        os.fsync(self._file.fileno())
        path = write_records(self.records, self.out / "pairs.json")
        # examples and pairs are always there, 0 included: a run that made no pair says so
        report = {**summary, "prepare": {"examples": 0, "pairs": 0, **self.stats}}
        atomic_write_text(self.out / "prepare_report.json", json.dumps(report, indent=1))
        return path

    def close(self) -> None:
        self._file.close()
