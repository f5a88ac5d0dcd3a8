"""fgpo: fine-grained preference optimization (FiRe-MPO) of medical vision-language models.

Commands, in the order of the pipeline:

  fgpo prepare   make on-policy preference pairs from a dataset (SLAKE, VQA-RAD, PathVQA,
                 IU-Xray) and a model: its answers, minimal edits, lesion-corrupted images
  fgpo train     train with FiRe-MPO (or DPO, RRPO, Mask-DPO, SFT) from a YAML config
                 (--config tiny runs a tiny offline model on generated data)
  fgpo eval      closed accuracy, open-answer match, report F1 and the grounding score
  fgpo demo      the whole pipeline on generated lesion scans, on a CPU, in a few minutes
  fgpo example   the fused loss ops against the materialized definition: values, time, memory

`fgpo COMMAND --help` explains each one.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "prepare": ("fgpo.pairs.prepare", "make on-policy preference pairs from a dataset"),
    "train": ("fgpo.train.command", "train a vision-language model from a YAML config"),
    "eval": ("fgpo.eval.evaluate", "accuracy, report F1 and grounding score of a model"),
    "demo": ("fgpo.demo.run", "the whole pipeline on generated scans (CPU, no network)"),
    "example": ("fgpo.example", "the fused loss ops against the materialized definition"),
}
# Modules that an optional extra brings, and the extra's name (pyproject.toml).
_EXTRAS = {
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "safetensors": "train",
    "matplotlib": "train",
    "tokenizers": "train",
    "pydicom": "data",
    "triton": "triton",
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    top = (exc.name or "").split(".")[0]
    return _EXTRAS.get(top)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fgpo",
        description=__doc__.split("\n\n", 2)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in _COMMANDS else None
    try:
        for name, (mod_name, help_) in _COMMANDS.items():
            p = sub.add_parser(name, help=help_, description=help_)
            if name == wanted:  # only import the module that runs
                importlib.import_module(mod_name).add_arguments(p)
        args = parser.parse_args(argv)
        return int(importlib.import_module(_COMMANDS[args.command][0]).run(args) or 0)
    except ModuleNotFoundError as exc:
        extra = _missing_extra(exc)
        if extra is None:
            raise
        print(
            f"fgpo {wanted or ''}: this command needs the '{extra}' extra ({exc.name} is not "
            f'installed): pip install "fgpo[{extra}]"',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
