"""What a checkpoint holds of a :class:`~fgpo.train.Trainer`, and putting it back.

The file format (atomic directories, digests, RNG states, ``latest``) is :mod:`.checkpoint`'s;
this module gathers the trainer's state for it (full tensors under FSDP2), writes the usable
artifact (``adapter/`` or ``model/``), and restores weights, optimizer and schedule on resume.
Resuming refuses a checkpoint written with another batch or process layout, and one written
with another config or data where that changes the result (unless explicitly allowed, said in
the log); a damaged latest checkpoint falls back to an older one only when asked. Functions
take the trainer as ``self``: they are its methods, kept here so the trainer file reads as the
step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from .. import models as M
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import OPERATIONAL_FIELDS, TrainConfig

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint of another run layout, config or data (the message lists what differs)."""


def trainer_state(self, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": step // self.steps_per_epoch,
        "position_in_epoch": (step % self.steps_per_epoch) * self.cfg.global_batch_size,
        "global_batch_size": self.cfg.global_batch_size,
        "world_size": self.world,
        "fsdp": self.fsdp,
        "skipped": self.skipped,
        "config": self.cfg.to_dict(),
        "train_file": os.path.abspath(self.train_file),
        "data_sha256": self.data_sha256,
        # the step's metrics row when it is not written yet (an interrupted eval or log)
        "pending": b.pending() if (b := self.boundary) is not None and b.step == step else None,
    }


def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainable tensors and optimizer state, gathered in full (collective under FSDP)."""
    if not self.fsdp:
        return self.trainable, self.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    full = {k: v.full_tensor() for k, v in self.trainable.items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full, get_optimizer_state_dict(self.policy, self.optimizer, options=opts)


def _export(self, path: str, full: dict[str, torch.Tensor]) -> None:
    """The usable artifact: ``adapter/`` (PEFT) or ``model/`` (Hub format + processor)."""
    if M.is_peft(self.model):
        self.model.save_pretrained(os.path.join(path, "adapter"))
        return
    out = os.path.join(path, "model")
    if self.fsdp:  # the module holds shards: write the weights gathered by save()
        sd = {k: v for k, v in self.model.state_dict().items() if not hasattr(v, "device_mesh")}
        sd.update(full)
        self.model.save_pretrained(out, state_dict={k: v.cpu() for k, v in sd.items()})
    else:
        self.model.save_pretrained(out)
    self.processor.save_pretrained(out)


def save_trainer(self, step: int, rng: dict[str, Any] | None = None) -> str:
    """Write checkpoint ``step`` of a :class:`~fgpo.train.Trainer` (every process calls it);
    ``rng``: the generator states of that step boundary (None: the current ones)."""
    full, opt_state = _full_state(self)
    frozen_full = None
    if self.fsdp and not M.is_peft(self.model):
        # Frozen shards (vision tower) are gathered on every rank for the export too.
        frozen_full = {
            k: v.full_tensor()
            for k, v in self.model.state_dict().items()
            if hasattr(v, "full_tensor") and k not in full
        }
    export = lambda path: _export(self, path, {**full, **(frozen_full or {})})
    return save_checkpoint(
        self.cfg.output_dir,
        step,
        rank=self.rank,
        trainable=full if self.is_main else {},
        optimizer_state=opt_state,
        scheduler_state=self.scheduler.state_dict(),
        state=trainer_state(self, step),
        rng=rng if rng is not None else rng_state(),
        export=export,
        keep=self.cfg.save_total_limit,
    )


def _candidates(out_dir: str) -> list[str]:
    """The latest checkpoint, then the older complete ones, newest first."""
    latest = latest_checkpoint(out_dir)
    if latest is None:
        return []
    older = [p for _, p in reversed(list_checkpoints(out_dir)) if p != latest]
    return [latest, *older]


def _verified(self, path: str | None, fallback: bool) -> tuple[str, dict[str, Any]] | None:
    """(path, contents) of the checkpoint to resume: ``path``, else the latest; with
    ``fallback``, the newest that verifies (said in the log)."""
    candidates = [path] if path else _candidates(self.cfg.output_dir)
    failed: list[str] = []
    for p in candidates:
        try:
            got = load_checkpoint(p, rank=self.rank, names=set(self.trainable))
        except CheckpointError as e:
            if not fallback or path:
                raise CheckpointError(
                    f"{e}. --resume-fallback (resume_fallback=True) resumes from the newest "
                    "checkpoint that verifies instead"
                ) from None
            log.warning("%s; trying an older checkpoint (--resume-fallback)", e)
            failed.append(os.path.basename(p))
            continue
        if failed:
            log.warning(
                "resuming from %s: %s failed verification (--resume-fallback)",
                p, ", ".join(failed),
            )  # fmt: skip
        return p, got
    if failed:
        raise CheckpointError(f"no checkpoint in {self.cfg.output_dir} verifies: {failed}")
    return None


def _config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """``"field: saved -> now"`` for every field that changes the result and differs.
    A field the checkpoint lacks (added to fgpo later) counts as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    now = cfg.to_dict()
    changes = []
    for name, value in now.items():
        if name in OPERATIONAL_FIELDS:
            continue
        before = saved.get(name, defaults.get(name))
        if before != value:
            changes.append(f"{name}: {before!r} -> {value!r}")
    return changes


def _check_same_run(self, path: str, state: dict[str, Any], allow: bool) -> None:
    """Refuse a checkpoint of another config or data (``allow``: continue, said in the log)."""
    changes = _config_changes(state.get("config", {}), self.cfg)
    if state.get("data_sha256") not in (None, self.data_sha256):
        changes.append(
            f"train_file: {self.train_file} changed since the checkpoint was written (its "
            "SHA-256 differs)"
        )
    if not changes:
        return
    listed = "; ".join(changes)
    if allow:
        log.warning("resuming %s with changes that change the result: %s", path, listed)
        return
    raise ResumeError(
        f"{path} was written with another config or data, and these change the result: "
        f"{listed}. Resume with the checkpoint's values, or pass --allow-config-change "
        "(allow_config_change=True) to continue anyway."
    )


def resume_trainer(
    self,
    path: str | None = None,
    *,
    fallback: bool = False,
    allow_config_change: bool = False,
) -> int:
    """Restore the latest (or the given) checkpoint into a trainer; returns its step (0 if
    none). Every file is verified first (:class:`~.checkpoint.CheckpointError` names a damaged
    one); ``fallback`` resumes from the newest checkpoint that verifies instead; a config or
    data that changes the result is refused unless ``allow_config_change``."""
    found = _verified(self, path, fallback)
    if found is None:
        return 0
    path, got = found
    state = got["state"]
    if state["global_batch_size"] != self.cfg.global_batch_size:
        raise ResumeError(
            f"{path} was written with global_batch_size={state['global_batch_size']}, "
            f"the config has {self.cfg.global_batch_size}"
        )
    if state["world_size"] != self.world or bool(state.get("fsdp")) != self.fsdp:
        raise ResumeError(
            f"{path} was written by {state['world_size']} processes (fsdp={state.get('fsdp')})"
            f", this run has {self.world} (fsdp={self.fsdp})"
        )
    _check_same_run(self, path, state, allow_config_change)
    with torch.no_grad():
        for k, p in self.trainable.items():
            src = got["trainable"][k].to(device=p.device, dtype=p.dtype)
            if hasattr(p, "device_mesh"):  # FSDP2 shard: keep this rank's part
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src, p.device_mesh, p.placements)
            p.copy_(src)
    if self.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self.policy,
            self.optimizer,
            optim_state_dict=got["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        self.optimizer.load_state_dict(got["optimizer"])
    self.scheduler.load_state_dict(got["scheduler"])
    self.pending = state.get("pending")
    set_rng_state(got["rng"])  # last: nothing after it may draw from the generators
    return int(state["step"])
