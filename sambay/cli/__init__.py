"""The `sambay` command line: argparse only, each subcommand imported when it is the one run.

Every command is one row of COMMANDS: its name, the `module:function` that adds its flags to the
parser made for it, and its one-line help. `sambay --help` imports no command module (so no torch),
and `sambay serve ...` imports only the serve command's module. The command modules (sambay/cli/*.py)
turn flags into calls of the library; the library itself never sees argparse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sambay.errors import SambayError

# name, where its flags are added, help; in the order of `sambay --help`.
COMMANDS = [
    ("info", "sambay.cli.info:add_info", "describe a model: layers, parameters, memory, decode state"),
    ("quantize", "sambay.cli.info:add_quantize", "write an int8 copy of a model folder"),
    ("generate", "sambay.cli.generate:add_generate", "generate text from a prompt, streamed to stdout"),
    ("chat", "sambay.cli.generate:add_chat", "chat with a model in the terminal"),
    ("serve", "sambay.cli.serve:add_serve", "serve a model over an OpenAI-compatible HTTP API"),
    ("prepare", "sambay.cli.prepare:add_prepare", "tokenize text files into a training data folder"),
    ("train", "sambay.cli.train:add_train", "train or fine-tune a model (one process or torchrun)"),
    ("bench", "sambay.cli.bench:add_bench", "measure decode, prefill, serving and generation speed"),
    ("eval", "sambay.cli.eval:add_eval", "evaluate a model: phonebook, needle, math"),
]


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n} (leave it out to use all cores)")
    return n


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is not a global option)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--threads":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: full flags for the command it names, names and help for the others.
    Without argv, every command gets its full flags (for tests and documentation)."""
    env_threads = os.environ.get("SAMBAY_THREADS") or None
    if env_threads is not None:
        try:
            env_threads = _threads(env_threads)
        except argparse.ArgumentTypeError as e:
            raise SambayError(f"SAMBAY_THREADS {e}; unset it to use all cores") from None
    parser = argparse.ArgumentParser(prog="sambay",
                                     description="Run, serve and train SambaY / Phi-4-mini-flash models on CPU.")
    parser.add_argument("--threads", type=_threads, default=env_threads,
                        metavar="N", help="CPU threads (default: all cores; env SAMBAY_THREADS)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for name, where, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if argv is None or name == chosen:
            module, function = where.split(":")
            getattr(importlib.import_module(module), function)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except SambayError as e:  # SAMBAY_THREADS set to something that is not a thread count
        print(f"sambay: error: {e}", file=sys.stderr)
        return 2
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
