"""`sambay prepare`: the flags of a data preparation, turned into a call of `sambay.train.prepare.prepare`.

    sambay prepare --builtin classics --train-tokenizer 4096 --out data/classics
    sambay prepare notes/ books.jsonl --tokenizer path/to/model --out data/mine

Everything that can be checked (the inputs, the output folder, the val fraction) is checked before
a tokenizer is trained, which can take minutes on a large corpus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sambay.errors import SambayError
from sambay.tokenizer import load_tokenizer, train_bpe_tokenizer
from sambay.train.corpus import BUILTIN_CORPORA, DEFAULT_BUILTIN, PACKAGES, builtin_corpus
from sambay.train.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, check_out_dir, prepare
from sambay.train.sources import iter_texts, resolve_sources


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.description = ("Tokenize text (.txt/.md: one document per file; .jsonl: a 'text' field per line; "
                     "folders: their .txt/.md/.jsonl files) into token shards for `sambay train`. "
                     f"Built-in corpora ({', '.join(BUILTIN_CORPORA)}) need: pip install "
                     + " ".join(f"'{pkg.requirement}'" for pkg in PACKAGES.values()))
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files, .jsonl files or folders")
    p.add_argument("--builtin", choices=list(BUILTIN_CORPORA), metavar="NAME",
                   help=f"use a built-in public-domain corpus: {', '.join(BUILTIN_CORPORA)} "
                        f"({DEFAULT_BUILTIN} = Shakespeare's plays + the King James Bible)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH", default=None,
                     help="tokenizer folder (a checkpoint) or 'phi4' (the default)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE", default=None,
                     help="train a byte-level BPE of this size on the inputs and save it in OUT/tokenizer")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"share of tokens kept for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-eos", action="store_true", help="do not put an end-of-text token after each document")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    if not args.inputs and not args.builtin:
        raise SambayError("give input files or folders, or --builtin NAME (e.g. --builtin classics)")
    inputs: list[Any] = []
    if args.builtin:
        inputs.extend(builtin_corpus(args.builtin))
    inputs.extend(args.inputs)
    # Check everything that can be checked before the (possibly long) tokenizer training.
    sources = resolve_sources(inputs)
    out_dir = Path(args.out)
    check_out_dir(out_dir, args.overwrite)
    if not 0 <= args.val_fraction <= 0.5:
        raise SambayError(f"--val-fraction must be between 0 and 0.5, got {args.val_fraction}")

    if args.train_tokenizer is not None:
        if not args.quiet:
            print(f"training a byte-level BPE tokenizer of {args.train_tokenizer} tokens ...", file=sys.stderr)
        tokenizer = train_bpe_tokenizer(iter_texts(sources), args.train_tokenizer)
        info: dict[str, Any] = {"source": "trained", "trained_vocab_size": args.train_tokenizer}
        save = True
    else:
        spec = args.tokenizer or "phi4"
        tokenizer = load_tokenizer(spec)
        info = {"source": "phi4" if spec == "phi4" else str(Path(spec).absolute())}
        save = False

    manifest = prepare(sources, tokenizer, out_dir, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, append_eos=not args.no_eos,
                       overwrite=args.overwrite, progress=not args.quiet, tokenizer_info=info,
                       save_tokenizer=save, builtin=args.builtin)
    splits = manifest["splits"]
    n_shards = sum(len(s["shards"]) for s in splits.values())
    print(f"wrote {manifest['num_tokens']:,} tokens from {manifest['num_documents']:,} documents "
          f"(train {splits['train']['num_tokens']:,}, val {splits['val']['num_tokens']:,}; "
          f"{manifest['dtype']}, vocab {manifest['vocab_size']:,}) in {n_shards} shard(s) to {out_dir}")
    return 0
