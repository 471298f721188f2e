"""The hyper-parameters of a training run, and what they decide: the learning-rate schedule and
which parameters get weight decay.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sambay.errors import SambayError

# Leaves that never get weight decay (besides every tensor with fewer than 2 dimensions, which
# covers biases, norm weights, D and the lambdas): A_log is the log of the SSM decay rates; decay
# would pull every A towards -1 and so erase the spread of time scales Mamba's init gives them.
NO_DECAY_LEAVES = {"bias", "A_log", "D", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}


@dataclass
class TrainSettings:
    """Training hyper-parameters. Those in TRAJECTORY decide the numbers a run produces."""

    steps: int = 1000
    batch_size: int = 8  # sequences per micro-step per process
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 6e-4
    min_lr: float | None = None  # end of the cosine; default lr / 10
    warmup: int | None = None  # linear warmup steps; default min(100, steps // 10)
    weight_decay: float = 0.1
    clip: float = 1.0  # max global gradient norm; 0 = no clipping
    label_smoothing: float = 0.0
    bf16: bool = False  # bfloat16 autocast (weights and optimizer stay float32)
    eval_every: int = 100  # steps between validation passes; 0 = never
    eval_batches: int = 20
    save_every: int = 500  # steps between checkpoints; 0 = only at the end (and on a signal)
    seed: int = 0
    fsdp: bool = False

    def resolved(self) -> TrainSettings:
        s = dataclasses.replace(self)
        if s.min_lr is None:
            s.min_lr = s.lr / 10
        if s.warmup is None:
            s.warmup = min(100, s.steps // 10)
        return s

    def check(self) -> None:
        def bad(msg: str) -> SambayError:
            return SambayError(f"invalid training setting: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "save_every", "warmup", "seed"):
            if int(getattr(self, name)) < 0:
                raise bad(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise bad(f"need 0 < --lr and 0 <= --min-lr <= --lr, got lr {self.lr}, min_lr {self.min_lr}")
        if self.warmup > self.steps:
            raise bad(f"--warmup {self.warmup} is longer than the run (--steps {self.steps})")
        if self.weight_decay < 0 or self.clip < 0:
            raise bad("--weight-decay and --clip must not be negative")
        if self.eval_every and self.eval_batches < 1:
            raise bad("--eval-batches must be at least 1 when --eval-every is set")
        if not 0 <= self.label_smoothing < 1:
            raise bad(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")


SETTING_NAMES = [f.name for f in dataclasses.fields(TrainSettings)]
# A resumed run must agree with its checkpoint on these, or it would not continue the same run.
TRAJECTORY = ("steps", "batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup",
              "weight_decay", "clip", "label_smoothing", "bf16", "seed")


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay for matrices (projections, conv kernels, the tied embedding/LM head); none for
    norms, biases, the SSM's A_log and D, and the differential-attention lambdas."""
    return p.dim() >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_LEAVES


def parameter_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """AdamW groups [decayed, not decayed] and the parameter names of each."""
    names: list[list[str]] = [[], []]
    params: list[list[nn.Parameter]] = [[], []]
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = 0 if decays(name, p) else 1
            names[g].append(name)
            params[g].append(p)
    groups = [{"params": params[0], "weight_decay": weight_decay},
              {"params": params[1], "weight_decay": 0.0}]
    return groups, names


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warmup to lr over `warmup` steps, then a cosine down to min_lr at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)
