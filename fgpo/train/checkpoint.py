"""Atomic, verified checkpoints that resume to exactly the state of an uninterrupted run.

A checkpoint ``OUT/checkpoint-<step>/`` holds:

* ``trainable.pt`` — the trainable parameters (LoRA adapters, or the trained model weights),
  exact values, by name; ``adapter/`` (PEFT ``save_pretrained``) or ``model/`` (Hub format,
  with the processor) for using the result;
* ``optimizer.pt``, ``scheduler.pt``;
* ``rng-<rank>.pt`` — Python, NumPy, torch CPU and CUDA generator states of every process,
  at the step boundary;
* ``trainer_state.json`` — step, data position, skip counts, the config, the data's digest;
* ``digests.json`` — the SHA-256 and size of every other file, written last.

It is written into ``OUT/.tmp-checkpoint-<step>`` and renamed in one ``os.replace`` once every
process has written its part, then ``OUT/latest`` (written the same way) names it. A crash
leaves either the previous checkpoint or the new one, never half of one; a save that fails
(a full disk) removes its temporary directory and says where it failed.

Reading back, every file is checked against its digest before it is loaded (a flipped bit is
an error naming the file, not a different run), and every ``.pt`` file is loaded with
``weights_only=True``: tensors and plain values only, so nothing in a checkpoint runs code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..data.files import atomic_write_text, sha256_file, write_error

_CKPT = re.compile(r"^checkpoint-(\d+)$")
DIGESTS = "digests.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from (in memory; :func:`set_rng_state` puts it back)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global generator is what we save)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_file(state: dict[str, Any]) -> dict[str, Any]:
    """The states as tensors and plain values (what ``weights_only=True`` reads back)."""
    version, mt, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _rng_from_file(saved: dict[str, Any]) -> dict[str, Any]:
    py, nps = saved["python"], saved["numpy"]
    state = {
        "python": (py["version"], tuple(py["mt"].tolist()), py["gauss"]),
        "numpy": (
            nps["kind"],
            nps["keys"].numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached"],
        ),
        "torch": saved["torch"],
    }
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


# --------------------------------------------------------------------------- writing


def _write_file(path: str, obj: Any) -> None:
    """``torch.save`` through a file we opened, flushed and synced: a write error is an
    ``OSError`` naming the file (a full disk says so), not torch's bare stream error."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(e, path) from e


def _digest_dir(root: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``root``."""
    table = {}
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            table[rel] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    return dict(sorted(table.items()))


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of complete checkpoints in ``out_dir``, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _CKPT.match(name)
        if m and os.path.exists(os.path.join(out_dir, name, "trainer_state.json")):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint named by ``OUT/latest``, else the highest-step complete one, else None."""
    pointer = os.path.join(out_dir, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(out_dir, f.read().strip())
        if os.path.exists(os.path.join(path, "trainer_state.json")):
            return path
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    out_dir: str,
    step: int,
    *,
    rank: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    rng: dict[str, Any],
    export: Any = None,
    keep: int = 0,
) -> str:
    """Write checkpoint ``step``. Every process calls this (it writes its RNG state ``rng``,
    taken at the step boundary); rank 0 writes the shared parts from ``trainable`` (full
    tensors by name) and the optimizer and scheduler states, which only rank 0 needs to hold.

    ``export(path)`` (rank 0) writes the usable artifact (adapter or Hub model + processor).
    ``keep`` > 0 deletes older checkpoints beyond that many (never the one just written).
    """
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = os.path.join(out_dir, f".tmp-checkpoint-{step}")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        _write_file(os.path.join(tmp, f"rng-{rank}.pt"), _rng_to_file(rng))
        if rank == 0:
            tensors = {k: v.detach().cpu().clone() for k, v in trainable.items()}
            _write_file(os.path.join(tmp, "trainable.pt"), tensors)
            _write_file(os.path.join(tmp, "optimizer.pt"), optimizer_state)
            _write_file(os.path.join(tmp, "scheduler.pt"), scheduler_state)
            if export is not None:
                export(tmp)
            atomic_write_text(
                os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1, default=str)
            )
        _barrier()
        if rank == 0:
            digests = _digest_dir(tmp)
            atomic_write_text(os.path.join(tmp, DIGESTS), json.dumps(digests, indent=1))
    except BaseException:
        if rank == 0:  # a partial checkpoint is of no use, and may hold the space a full disk needs
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        old = os.path.join(out_dir, f".old-checkpoint-{step}")
        if os.path.exists(final):  # re-saving a step (interrupted during its first save)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # a kill before the next rename is repaired on start
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(os.path.join(out_dir, "latest"), os.path.basename(final))
        if keep > 0:
            for _, path in list_checkpoints(out_dir)[:-keep]:
                if path != final:
                    shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return final


# --------------------------------------------------------------------------- reading


def _verify(path: str, name: str, digests: dict[str, Any]) -> str:
    """The file's path once its size and SHA-256 match those recorded at saving."""
    where = os.path.join(path, name)
    want = digests.get(name)
    if not isinstance(want, dict) or "sha256" not in want:
        raise CheckpointError(f"{where} has no digest in {os.path.join(path, DIGESTS)}")
    if not os.path.isfile(where):
        raise CheckpointError(f"{where} is missing")
    size = os.path.getsize(where)
    if size != want.get("bytes"):
        raise CheckpointError(
            f"{where} is damaged: {size} bytes, but {want.get('bytes')} were written "
            "(truncated or overwritten)"
        )
    if sha256_file(where) != want["sha256"]:
        raise CheckpointError(
            f"{where} is damaged: its SHA-256 differs from the one recorded when it was saved "
            "(a flipped bit or an edited file)"
        )
    return where


def _load_pt(where: str) -> Any:
    try:
        return torch.load(where, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {where}: it holds Python objects other than tensors and plain "
            f"values, and checkpoints are read with weights_only=True so nothing in them runs "
            f"({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{where} cannot be read: {type(e).__name__}: {e}") from None


def load_checkpoint(path: str, *, rank: int, names: set[str]) -> dict[str, Any]:
    """Verify and read checkpoint ``path``.

    Returns ``trainable`` (tensors by name, checked against ``names``), ``optimizer``,
    ``scheduler``, ``state`` (the trainer state) and ``rng`` (this rank's generator states);
    the caller puts them in place. Raises :class:`CheckpointError` naming the file when one is
    missing, damaged (its digest differs) or holds anything but tensors and plain values.
    """
    digest_path = os.path.join(path, DIGESTS)
    try:
        with open(digest_path, encoding="utf-8") as f:
            digests = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{digest_path} is missing: the checkpoint is incomplete or was written by an "
            "fgpo without digests, so it cannot be verified"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{digest_path} is damaged: not valid JSON ({e})") from None
    if not isinstance(digests, dict):
        raise CheckpointError(f"{digest_path} is damaged: not a JSON object")
    rng_name = f"rng-{rank}.pt"
    if not os.path.exists(os.path.join(path, rng_name)):
        raise CheckpointError(
            f"{path} has no RNG state for rank {rank}: resume with the same number of processes"
        )
    files = ("trainable.pt", "optimizer.pt", "scheduler.pt", rng_name, "trainer_state.json")
    where = {name: _verify(path, name, digests) for name in files}
    saved = _load_pt(where["trainable.pt"])
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where['trainable.pt']} is not a dict of tensors")
    missing, unexpected = sorted(names - set(saved)), sorted(set(saved) - names)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written with another model or LoRA setting?)"
        )
    try:
        with open(where["trainer_state.json"], encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where['trainer_state.json']} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{where['trainer_state.json']} holds no trainer state")
    rng_saved = _load_pt(where[rng_name])
    try:
        rng = _rng_from_file(rng_saved)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where[rng_name]} is not an RNG state ({e!r})") from None
    return {
        "trainable": saved,
        "optimizer": _load_pt(where["optimizer.pt"]),
        "scheduler": _load_pt(where["scheduler.pt"]),
        "state": state,
        "rng": rng,
    }
