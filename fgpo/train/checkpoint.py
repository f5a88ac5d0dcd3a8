"""Atomic checkpoints that resume to exactly the state of an uninterrupted run.

A checkpoint ``OUT/checkpoint-<step>/`` holds:

* ``trainable.pt`` — the trainable parameters (LoRA adapters, or the trained model weights),
  exact values, by name; ``adapter/`` (PEFT ``save_pretrained``) or ``model/`` (Hub format,
  with the processor) for using the result;
* ``optimizer.pt``, ``scheduler.pt``;
* ``rng-<rank>.pt`` — Python, NumPy, torch CPU and CUDA generator states of every process;
* ``trainer_state.json`` — step, data position, skip counts, the config.

It is written into ``OUT/.tmp-checkpoint-<step>`` and renamed in one ``os.replace`` once every
process has written its part, then ``OUT/latest`` (written the same way) names it. A crash
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
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


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    export: Any = None,
    keep: int = 0,
) -> str:
    """Write checkpoint ``step``. Every process calls this (it writes its RNG state); rank 0
    writes the shared parts from ``trainable`` (full tensors by name) and the optimizer and
    scheduler states, which only rank 0 needs to hold.

    ``export(path)`` (rank 0) writes the usable artifact (adapter or Hub model + processor).
    ``keep`` > 0 deletes older checkpoints beyond that many.
    """
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = os.path.join(out_dir, f".tmp-checkpoint-{step}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in trainable.items()},
                   os.path.join(tmp, "trainable.pt"))  # fmt: skip
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
        if export is not None:
            export(tmp)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1, default=str)
    _barrier()
    if rank == 0:
        if os.path.exists(final):  # re-saving the same step (e.g. resumed at the end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(out_dir, "latest"), os.path.basename(final))
        if keep > 0:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str, *, rank: int, names: set[str]) -> dict[str, Any]:
    """Read checkpoint ``path`` and restore this rank's RNG states.

    Returns ``trainable`` (tensors by name, checked against ``names``), ``optimizer``,
    ``scheduler`` and ``state`` (the trainer state); the caller puts them in place.
    """
    saved = torch.load(os.path.join(path, "trainable.pt"), map_location="cpu", weights_only=True)
    missing, unexpected = sorted(names - set(saved)), sorted(set(saved) - names)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written with another model or LoRA setting?)"
        )
    rng_path = os.path.join(path, f"rng-{rank}.pt")
    if not os.path.exists(rng_path):
        raise ValueError(
            f"{path} has no RNG state for rank {rank}: resume with the same number of processes"
        )
    out = {
        "trainable": saved,
        "optimizer": torch.load(
            os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False
        ),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), weights_only=False),
    }
    with open(os.path.join(path, "trainer_state.json")) as f:
        out["state"] = json.load(f)
    set_rng_state(torch.load(rng_path, weights_only=False))
    return out
