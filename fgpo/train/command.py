"""``fgpo train --config FILE|NAME [--output-dir DIR] [--max-steps N] [--resume] [--set k=v ...]``

Runs the trainer from a YAML config (``fgpo.train.TrainConfig``): a file, or the name of a
config shipped with the package (``tiny``). Under ``torchrun`` every process runs this same
command. Prints the summary as JSON at the end (rank 0).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML file with TrainConfig fields, or a shipped config's name (e.g. tiny)",
    )
    p.add_argument("--output-dir", default=None, help="overrides output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="overrides max_steps")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (value parsed as YAML); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    from .config import TrainConfig, resolve_config
    from .trainer import Trainer

    try:
        path = resolve_config(args.config)
    except FileNotFoundError as e:
        raise SystemExit(f"fgpo train: {e}") from None

    overrides = list(args.overrides or [])
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = TrainConfig.from_yaml(path, overrides)
    trainer = Trainer(cfg)
    summary = trainer.train(resume=args.resume)
    if trainer.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}, indent=1))
    return 0
