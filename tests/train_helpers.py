"""Shared helpers of the trainer tests: a small config, a trainer on a copy of the tiny model,
its trainable tensors, and the rows of a run's ``metrics.jsonl``."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from fgpo.train import TrainConfig, Trainer


def make_cfg(tmp_path, prefs: str, **kw: Any) -> TrainConfig:
    """LoRA r 4 on the tiny LLaVA, fp32, 2 steps of 8 examples in micro-batches of 4, no
    checkpoints but the last; ``kw`` overrides any field."""
    base = dict(
        model="tiny-llava",
        dtype="float32",
        train_file=prefs,
        output_dir=str(tmp_path / "run"),
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lr=5e-3,
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=2,
        save_steps=0,
        progress_bar=False,
        tensorboard=False,
        gradient_checkpointing=False,
        impl="torch",
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(cfg: TrainConfig, llava, **kw: Any) -> Trainer:
    """A trainer on a deep copy of the session's tiny model (``kw``: e.g. ``eval_fn``)."""
    model, proc = llava
    return Trainer(cfg, model=copy.deepcopy(model), processor=proc, **kw)


def trainable(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.trainable.items()}


def read_rows(out_dir) -> list[dict[str, Any]]:
    """The metrics rows of a run without their timings (which differ between runs)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(r) for r in f]
    for r in rows:
        r.pop("time_s")
    return rows
