"""``fgpo`` command line: one subcommand per module, each module owning its own arguments.

    fgpo train    --config FILE [--output-dir DIR] [--max-steps N] [--resume]   (fgpo.train)
    fgpo prepare  ...                                                            (fgpo.prepare)
    fgpo eval     ...                                                            (fgpo.evaluate)
    fgpo demo     --out DIR [--quick]                                            (fgpo.demo)
    fgpo example                                                                 (fgpo.example)

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``; importing is lazy so
that ``fgpo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "train": ("fgpo.train.command", "FiRe-MPO training of a vision-language model"),
    "prepare": ("fgpo.pairs.prepare", "build on-policy preference pairs from a VQA/report dataset"),
    "eval": ("fgpo.eval.evaluate", "closed/open accuracy, report F1 and grounding score"),
    "demo": ("fgpo.demo.run", "the embedded end-to-end demo (CPU, no network)"),
    "example": ("fgpo.example", "a small working example of the fused ops"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fgpo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = argv[0] if argv and argv[0] in _COMMANDS else None
    for name, (mod_name, help_) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:  # only import the module that runs
            importlib.import_module(mod_name).add_arguments(p)
    args, _ = parser.parse_known_args(argv) if wanted is None else (parser.parse_args(argv), None)
    mod = importlib.import_module(_COMMANDS[args.command][0])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
