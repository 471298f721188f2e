"""`sambay train`: the flags of a training run, turned into a call of `sambay.train.trainer.train`.

    sambay train --preset small --data data/classics --out runs/small --steps 2000 --seq-len 256
    sambay train --data data/classics --out runs/small --resume

Every setting flag defaults to None (not to its TrainSettings default), so that a flag left out on
--resume is taken from the checkpoint and only the flags given are checked against it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sambay.models import PRESETS, load_config, preset
from sambay.train.settings import SETTING_NAMES, TrainSettings
from sambay.train.trainer import train


def add_train(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a SambaY model, or the Phi3 Transformer baseline (AdamW, warmup + cosine, clipping, "
                     "accumulation) on a folder made by `sambay prepare`. Under torchrun it trains data-parallel "
                     "(DDP, or FSDP2 with --fsdp). Flags left out on --resume come from the checkpoint.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--config", metavar="FILE", help="model config.json (or a folder holding one)")
    model.add_argument("--preset", metavar="NAME", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared token folder")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoints, metrics, model)")
    d = TrainSettings()
    add = p.add_argument
    add("--steps", metavar="N", type=int, help=f"optimizer steps (default {d.steps})")
    add("--batch-size", metavar="N", type=int, help=f"sequences per micro-step per process (default {d.batch_size})")
    add("--seq-len", metavar="N", type=int, help=f"tokens per sequence (default {d.seq_len})")
    add("--grad-accum", metavar="K", type=int, help=f"micro-steps per optimizer step (default {d.grad_accum})")
    add("--lr", metavar="LR", type=float, help=f"peak learning rate (default {d.lr})")
    add("--min-lr", metavar="LR", type=float, help="final learning rate of the cosine (default lr/10)")
    add("--warmup", metavar="N", type=int, help="linear warmup steps (default min(100, steps/10))")
    add("--weight-decay", metavar="X", type=float, help=f"AdamW weight decay of the matrices (default {d.weight_decay})")
    add("--clip", metavar="NORM", type=float, help=f"max gradient norm, 0 = off (default {d.clip})")
    add("--label-smoothing", metavar="X", type=float, help=f"label smoothing of the loss (default {d.label_smoothing})")
    add("--attention-dropout", metavar="P", type=float, help="attention dropout, written into the model config")
    add("--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bfloat16 autocast for the forward pass (weights stay float32)")
    add("--eval-every", metavar="N", type=int, help=f"steps between validation passes, 0 = never (default {d.eval_every})")
    add("--eval-batches", metavar="N", type=int, help=f"validation batches per pass (default {d.eval_batches})")
    add("--save-every", metavar="N", type=int, help=f"steps between checkpoints, 0 = end only (default {d.save_every})")
    add("--seed", metavar="S", type=int, help=f"seed of init, data order and dropout (default {d.seed})")
    add("--fsdp", action=argparse.BooleanOptionalAction, default=None,
        help="under torchrun: shard weights and optimizer state (FSDP2) instead of DDP")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--override", action="append", default=[], metavar="KEY=VALUE",
        help="change a model config field, e.g. --override resid_pdrop=0.1 (repeatable)")
    add("--quiet", action="store_true", help="no per-step progress line (messages still print)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    config = None
    if args.config:
        path = Path(args.config)
        config = load_config(path / "config.json" if path.is_dir() else path)
    elif args.preset:
        config = preset(args.preset)
    given = {k: getattr(args, k) for k in SETTING_NAMES if getattr(args, k, None) is not None}
    result = train(args.data, args.out, config, resume=args.resume, attention_dropout=args.attention_dropout,
                   overrides=args.override, preset_name=args.preset, quiet=args.quiet, **given)
    return 128 + result.stopped_by if result.stopped_by else 0
