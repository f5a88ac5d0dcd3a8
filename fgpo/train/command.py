"""``fgpo train --config FILE|NAME [--output-dir DIR] [--max-steps N] [--resume | --overwrite]
[--allow-config-change] [--resume-fallback] [--set k=v ...]``

Runs the trainer from a YAML config (``fgpo.train.TrainConfig``): a file, or the name of a
config shipped with the package (``tiny``). Under ``torchrun`` every process runs this same
command. Prints the summary as JSON at the end (rank 0).
"""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML file with TrainConfig fields, or a shipped config's name (e.g. tiny)",
    )
    p.add_argument("--output-dir", default=None, help="overrides output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="overrides max_steps")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="output_dir holds another run: move its files to OUTPUT.old-<time> and start anew",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="--resume although the config or data differ from the checkpoint's in something "
        "that changes the result (listed in the log)",
    )
    p.add_argument(
        "--resume-fallback",
        action="store_true",
        help="--resume from the newest checkpoint that verifies when the latest is damaged",
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
    from ..data import DatasetError, MaskTagError
    from .checkpoint import CheckpointError
    from .config import TrainConfig, resolve_config
    from .guard import NonFiniteLossError
    from .rundir import RunExistsError
    from .state import ResumeError
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig.from_yaml(path, overrides)
        trainer = Trainer(cfg)
    except ValueError as e:  # a config value: the message names the field
        raise SystemExit(f"fgpo train: {e}") from None
    # A problem of the data, the output directory or a checkpoint, or a diverging run: the
    # message says what to do (a traceback would bury it); the exit status is 1.
    expected = (DatasetError, MaskTagError, FileNotFoundError, RunExistsError, CheckpointError,
                ResumeError, NonFiniteLossError)  # fmt: skip
    try:
        summary = trainer.train(
            resume=args.resume,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
            resume_fallback=args.resume_fallback,
        )
    except expected as e:
        raise SystemExit(f"fgpo train: {e}") from None
    if trainer.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}, indent=1))
    return 0
