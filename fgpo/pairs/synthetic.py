"""A small generated preference set for offline runs (``generate_tiny_data``, tests, benchmarks).

The pipeline's own steps on generated scans (:mod:`fgpo.data.synthetic`): every scan has a
lesion, the "model" answers each question wrongly, :class:`~fgpo.pairs.editors.ReferenceEditor`
makes the one-word minimal edit, and every ``corrupt_every``-th record gets a lesion-corrupted
image (the paper's noise inside the lesion mask), so batches mix examples with and without v'.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ..data import synthetic, write_records
from ..models.tiny import cache_dir
from .corrupt import CorruptConfig
from .editors import ReferenceEditor
from .prepare import prepare_pairs

FILE_NAME = "preferences.json"
_VERSION = "v1"  # bump when the generator changes so cached sets are rebuilt


def make_preference_set(
    out_dir: str | Path, n: int = 32, seed: int = 0, corrupt_every: int = 2, size: int = 32
) -> str:
    """Write ``n`` preference records (``OUT/preferences.json``) and their images; return the
    JSON path. Ids are ``tiny-<seed>-<i>``; image paths are absolute."""
    out_dir = Path(out_dir)
    raw = synthetic.make_dataset(n, seed, size=size, p_lesion=1.0, prefix="tiny-")
    examples = synthetic.write_examples(raw, out_dir / "images")
    wrong = {
        e.id: synthetic.ANSWERS[(e.qtype, synthetic.wrong_label(e.qtype, e.label))] for e in raw
    }
    cfg = CorruptConfig(mode="noise", fallback="skip")
    records = prepare_pairs(
        examples, lambda ex: wrong[ex.id], ReferenceEditor(), cfg, out_dir,
        image_dir=out_dir / "images",
    )  # fmt: skip
    for i, rec in enumerate(records):
        if not corrupt_every or i % corrupt_every:
            rec.pop("rejected_image_path", None)
            rec.pop("corrupt_source", None)
    return str(write_records(records, out_dir / FILE_NAME))


def ensure_preference_set(n: int, seed: int) -> str:
    """The JSON path of ``n`` generated records for ``seed``, built once under the cache
    directory (``$FGPO_CACHE/data/``, like the tiny models) and reused: the trainer's
    ``generate_tiny_data``. Never written beside a user's path."""
    path = os.path.join(cache_dir(), "data", f"tiny-prefs-{_VERSION}-n{n}-seed{seed}")
    target = os.path.join(path, FILE_NAME)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "w") as lock:  # one builder at a time (records hold abs paths)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(target):  # the JSON is written last and atomically: a set
            shutil.rmtree(path, ignore_errors=True)  # without it is a killed build
            make_preference_set(path, n=n, seed=seed)
    return target
