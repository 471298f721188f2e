"""The `sambay` command line.

Each subcommand lives in the module that does the work: that module has a `register(subparsers)`
function which adds its parser and sets `func` to a function `(args) -> int`. This file only
collects them, so adding a command never means editing a long central file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import SambayError

# Modules that contribute subcommands, in the order they appear in `sambay --help`.
COMMAND_MODULES = [
    "sambay.commands",  # info, quantize
    "sambay.generate_cli",  # generate, chat
    "sambay.server",  # serve
    "sambay.data",  # prepare
    "sambay.train",  # train
    "sambay.bench",  # bench
    "sambay.evals.cli",  # eval phonebook, needle, math
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sambay",
        description="Run, serve and train SambaY / Phi-4-mini-flash models on CPU.",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SAMBAY_THREADS", "0")),
                        help="CPU threads for PyTorch (default: all cores; env SAMBAY_THREADS)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except SambayError as e:
        print(f"sambay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sambay: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sambay info | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush can't raise
        return 141


if __name__ == "__main__":
    sys.exit(main())
