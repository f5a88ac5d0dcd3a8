"""The output directory of a run: one run per directory, nothing deleted silently.

A new run into a directory that holds another run's files is refused (``--resume`` continues
that run; ``--overwrite`` moves its files, whole, to a sibling ``OUT.old-<time>``). Before a
run starts, what killed saves left behind is tidied: temporary checkpoint directories and
pointer files are removed (they were never complete), and a checkpoint moved aside for a
re-save that never finished is put back.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# The files a training run writes into its output directory.
_RUN_FILES = re.compile(
    r"^(checkpoint-\d+|\.tmp-checkpoint-\d+|\.old-checkpoint-\d+|latest|latest\.tmp-\d+"
    r"|metrics\.jsonl(\.tmp-\d+)?|tensorboard)$"
)
_TMP = re.compile(r"^(\.tmp-checkpoint-\d+|latest\.tmp-\d+|metrics\.jsonl\.tmp-\d+)$")
_OLD = re.compile(r"^\.old-checkpoint-(\d+)$")


class RunExistsError(FileExistsError):
    """The output directory holds another run (the message says how to go on)."""


def run_entries(out_dir: str) -> list[str]:
    """Names in ``out_dir`` that a training run wrote, sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if _RUN_FILES.match(n))


def prepare_output_dir(
    out_dir: str, *, resume: bool, overwrite: bool, is_main: bool, barrier: Callable[[], None]
) -> None:
    """Refuse, or move aside, another run in ``out_dir``; then tidy leftovers of kills.

    Every process checks before any writes (so all of them refuse together); the main process
    moves and tidies.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or move it")
    entries = run_entries(out_dir)
    if entries and not resume and not overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RunExistsError(
            f"{out_dir} holds another run ({shown}): pass --resume to continue it, --overwrite "
            f"to move its files aside (to {out_dir.rstrip(os.sep)}.old-<time>), or choose "
            "another --output-dir (in Python: Trainer.train(resume=True) or overwrite=True)"
        )
    barrier()
    if is_main:
        if entries and overwrite:
            dest = move_run_aside(out_dir, entries)
            log.warning(
                "moved the previous run's %d files in %s to %s", len(entries), out_dir, dest
            )
        for what in clean_leftovers(out_dir):
            log.warning("%s", what)
    barrier()


def move_run_aside(out_dir: str, entries: list[str]) -> str:
    """Move ``entries`` of ``out_dir`` into a new sibling ``<out_dir>.old-<time>``; its path."""
    base = f"{os.path.normpath(out_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, k = base, 1
    while os.path.exists(dest):
        k += 1
        dest = f"{base}-{k}"
    os.makedirs(dest)
    for name in entries:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    return dest


def clean_leftovers(out_dir: str) -> list[str]:
    """Remove what an interrupted save left in ``out_dir``; one line per action taken."""
    done: list[str] = []
    for name in run_entries(out_dir):
        path = os.path.join(out_dir, name)
        if _TMP.match(name):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            done.append(f"removed {path}, left incomplete by an interrupted save")
        elif m := _OLD.match(name):
            final = os.path.join(out_dir, f"checkpoint-{m.group(1)}")
            if os.path.exists(final):
                shutil.rmtree(path)
                done.append(f"removed {path}, replaced by {final} before the interruption")
            else:
                os.replace(path, final)
                done.append(f"restored {final}, moved aside by a re-save that was interrupted")
    return done
