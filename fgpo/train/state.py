"""What a checkpoint holds of a :class:`~fgpo.train.Trainer`, and putting it back.

The file format (atomic directories, RNG states, ``latest``) is :mod:`.checkpoint`'s; this
module gathers the trainer's state for it (full tensors under FSDP2), writes the usable
artifact (``adapter/`` or ``model/``), and restores weights, optimizer and schedule on resume,
refusing a checkpoint written with another batch or process layout. Functions take the trainer
as ``self``: they are its methods, kept here so the trainer file reads as the step.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import models as M
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


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


def save_trainer(self, step: int) -> str:
    """Write checkpoint ``step`` of a :class:`~fgpo.train.Trainer` (every process calls it)."""
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
        export=export,
        keep=self.cfg.save_total_limit,
    )


def resume_trainer(self, path: str | None = None) -> int:
    """Restore the latest (or the given) checkpoint into a trainer; returns its step (0 if
    none)."""
    path = path or latest_checkpoint(self.cfg.output_dir)
    if path is None:
        return 0
    got = load_checkpoint(path, rank=self.rank, names=set(self.trainable))
    state = got["state"]
    if state["global_batch_size"] != self.cfg.global_batch_size:
        raise ValueError(
            f"{path} was written with global_batch_size={state['global_batch_size']}, "
            f"the config has {self.cfg.global_batch_size}"
        )
    if state["world_size"] != self.world or bool(state.get("fsdp")) != self.fsdp:
        raise ValueError(
            f"{path} was written by {state['world_size']} processes (fsdp={state.get('fsdp')})"
            f", this run has {self.world} (fsdp={self.fsdp})"
        )
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
    return int(state["step"])
