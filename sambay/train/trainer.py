"""`sambay train`: pretrain a SambaY model (or the Phi3 Transformer baseline, e.g. `--preset
small-phi3`) on a prepared token folder, on one or many processes.

    sambay prepare --builtin classics --train-tokenizer 4096 --out data/classics
    sambay train --preset small --data data/classics --out runs/small --steps 2000 --seq-len 256
    sambay train --data data/classics --out runs/small --resume          # continue where it stopped
    torchrun --standalone --nproc_per_node 2 -m sambay train ...      # data-parallel (DDP)
    torchrun --standalone --nproc_per_node 2 -m sambay train ... --fsdp   # sharded (FSDP2)

What ends up in OUT:
    run.json        the model config and training settings of the run (written first)
    metrics.jsonl   one line per step (loss: the objective, label smoothing included; lr, grad norm,
                    tokens/s) and one per evaluation (val_loss: plain next-token cross-entropy)
    loss.png        the loss curves, redrawn at every evaluation
    checkpoint/     model.safetensors (full fp32 weights), optimizer.safetensors (AdamW moments,
                    by parameter name), trainer.json (step, settings, config, data fingerprint,
                    schedule, optimizer groups, the RNG states of every rank). Written into a
                    temporary folder and swapped in by rename, so a crash never leaves half of one.
    model/          the final model as a Hugging Face folder (sambay.load_model reads it), with the
                    tokenizer of the data when there is one.

Resuming restores weights, optimizer, schedule position, data position and every RNG, so a run
stopped (SIGINT/SIGTERM save a checkpoint first) or killed and resumed follows the same loss curve
as one that never stopped. Settings left out on --resume are taken from the checkpoint; settings
given must match it.

This module is the loop; the settings and schedule are in `sambay.train.settings`, the checks
before a run in `sambay.train.plan`, the files of a run in `sambay.train.checkpoint`, the
process group in `sambay.train.distributed` and the flags in `sambay.cli.train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sambay.errors import SambayError
from sambay.models import CausalLM, ModelConfig, build_model
from sambay.train import distributed as D
from sambay.train.checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, MODEL_DIR, RUN_FILE,
                                     export, read_checkpoint_tensors, write_checkpoint, write_run_file)
from sambay.train.dataset import TokenDataset
from sambay.train.log import Metrics, Progress
from sambay.train.plan import Plan, plan_run
from sambay.train.settings import TrainSettings, learning_rate, parameter_groups


@dataclass
class TrainResult:
    """What a `train` call ends with."""

    model: CausalLM | None  # the trained model in eval mode (None on ranks > 0 under FSDP)
    step: int
    losses: list[float]  # training loss of each step this call ran
    val_loss: float | None
    stopped_by: int | None  # the signal that stopped the run early, if any
    out: Path


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Linux /proc/cpuinfo flags; True where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (it saves a checkpoint first);
    a second signal stops at once (checkpoints are atomic, so that loses only the unsaved steps)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(data: str | os.PathLike, out: str | os.PathLike, config: ModelConfig | None = None, *,
          resume: bool = False, attention_dropout: float | None = None,
          overrides: list[str] | tuple[str, ...] = (), preset_name: str | None = None,
          on_step: Callable[[int, float], None] | None = None, quiet: bool = False,
          **settings: Any) -> TrainResult:
    """Train (or resume) a run; the Python twin of `sambay train`. `settings` are TrainSettings
    fields; those left out come from the checkpoint on resume, else the defaults. `on_step(step,
    loss)` is called after every optimizer step (tests use it to simulate a crash)."""
    env = D.setup()
    try:
        plan = plan_run(data, out, config, resume, settings, attention_dropout, overrides,
                        env.world_size, preset_name)
        D.barrier(env)  # every rank has checked the run folder before rank 0 writes into it
        return _run(plan, env, on_step, quiet)
    finally:
        D.teardown(env)


def _run(plan: Plan, env: D.DistEnv, on_step, quiet: bool) -> TrainResult:
    cfg, s, out, dataset = plan.cfg, plan.settings, plan.out, plan.dataset
    main = env.is_main
    progress = Progress(s.steps, enabled=main, live=not quiet)
    for note in plan.notes:
        progress.message(f"sambay train: {note}")
    if s.bf16 and env.device.type == "cpu" and not cpu_has_native_bf16():
        progress.message("sambay train: note: this CPU has no bf16 arithmetic (no avx512_bf16 or amx_bf16), "
                         "so bf16 autocast is emulated and usually slower than float32; consider --no-bf16")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_FILE).exists():
            write_run_file(out, {"config": cfg.to_dict(), "settings": dataclasses.asdict(s),
                                 "world_size": env.world_size, "data": plan.fingerprint,
                                 "data_dir": str(plan.data_dir.absolute())})

    # Model, wrapped for data parallelism; the optimizer sees the wrapped (possibly sharded) params.
    D.seed_everything(s.seed, env)
    model = build_model(cfg, torch.float32, device=str(env.device), init=True, seed=s.seed)
    step = 0
    if plan.checkpoint is not None:
        weights = read_checkpoint_tensors(plan.checkpoint, "model.safetensors")
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise SambayError(f"{plan.checkpoint} does not fit the model config ({e})") from None
        step = int(plan.meta["step"])
    model.train()
    wrapped = D.wrap(model, env, s.fsdp)
    groups, group_names = parameter_groups(model, s.weight_decay)
    names = {p: n for g, ns in zip(groups, group_names) for p, n in zip(g["params"], ns)}
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
    if plan.checkpoint is not None:
        tensors = read_checkpoint_tensors(plan.checkpoint, "optimizer.safetensors")
        D.load_optimizer_state(optimizer, names, tensors, plan.meta["optimizer"]["param_groups"])
        rngs = plan.meta["rng"]
        D.set_rng_state(rngs[env.rank])
        progress.message(f"sambay train: resumed {out} at step {step}")

    metrics = Metrics(out, keep_until=step if plan.checkpoint is not None else None, enabled=main)
    batches = dataset.batches("train", s.seq_len, s.batch_size, rank=env.rank, world_size=env.world_size,
                              start_step=step * s.grad_accum, seed=s.seed)
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * env.world_size
    val_loss = plan.meta.get("val_loss") if plan.meta else None
    losses: list[float] = []

    def autocast() -> torch.autocast:  # a fresh context each time (bf16 off: does nothing)
        return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=s.bf16)

    def evaluate() -> float:
        nonlocal val_loss
        val_loss = _validation_loss(D.unwrap(wrapped), dataset, s, env, autocast)
        metrics.log(step=step, val_loss=val_loss, tokens=step * tokens_per_step)
        metrics.plot()
        progress.message(f"step {step}: validation loss {val_loss:.4f}")
        return val_loss

    def save() -> None:
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "tokens": step * tokens_per_step, "world_size": env.world_size,
            "settings": dataclasses.asdict(s), "config": cfg.to_dict(), "data": plan.fingerprint,
            "schedule": {"kind": "linear warmup, then cosine to min_lr", "lr": s.lr,
                         "min_lr": s.min_lr, "warmup": s.warmup, "steps": s.steps,
                         "next_lr": learning_rate(step, s)},
            "val_loss": val_loss,
        }
        model_state = D.model_state(wrapped)
        optim_tensors, optim_groups = D.optimizer_state(optimizer, names)
        meta["optimizer"] = {"class": "AdamW", "param_groups": optim_groups}
        meta["rng"] = D.gather(D.rng_state(), env)
        if main:
            write_checkpoint(out, model_state, optim_tensors, meta)
        D.barrier(env)

    stopped_by = None
    with StopSignals() as signals, contextlib.closing(metrics), contextlib.closing(progress):
        if step == 0 and s.eval_every:
            evaluate()
        started, start_step = time.perf_counter(), step
        while step < s.steps:
            lr = learning_rate(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = _train_step(wrapped, optimizer, batches, s, env, autocast, cfg.vocab_size)
            step += 1
            if not math.isfinite(loss):
                raise SambayError(f"the training loss became {loss} at step {step}; lower --lr or "
                                  f"use --clip, and resume from the last checkpoint with --resume")
            losses.append(loss)
            elapsed = time.perf_counter() - started
            rate = (step - start_step) / elapsed
            metrics.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=step * tokens_per_step,
                        tokens_per_s=rate * tokens_per_step, time=round(elapsed, 3))
            progress.update(step, loss, lr, rate * tokens_per_step, (s.steps - step) / rate)
            if on_step is not None:
                on_step(step, loss)
            stop = D.any_rank(signals.signum is not None, env)
            if s.eval_every and (step % s.eval_every == 0 or step == s.steps):
                evaluate()
            if stop or step == s.steps or (s.save_every and step % s.save_every == 0):
                save()
                if not stop:
                    progress.message(f"step {step}: checkpoint saved to {out / CHECKPOINT_DIR}")
            if stop:
                stopped_by = signals.signum or signal.SIGTERM
                progress.message(f"sambay train: stopped by {signal.Signals(stopped_by).name} at step "
                                 f"{step}; checkpoint saved, continue with --resume")
                break
        metrics.plot()

    final = _full_model(wrapped, cfg, env, s.fsdp)
    if step == s.steps and stopped_by is None:
        if main:
            export(final, out / MODEL_DIR, dataset)
            progress.message(f"sambay train: done, {step} steps; model saved to {out / MODEL_DIR}")
        D.barrier(env)
    return TrainResult(final, step, losses, val_loss, stopped_by, out)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, s: TrainSettings,
                env: D.DistEnv, autocast, vocab: int) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches; returns (mean loss over ranks, grad norm)."""
    total = torch.zeros((), device=env.device)
    for micro in range(s.grad_accum):
        x, y = next(batches)
        x, y = x.to(env.device), y.to(env.device)
        with D.gradient_sync(model, micro == s.grad_accum - 1):
            with autocast():
                logits = model(x)  # (B, T, V) float32
            loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1),
                                   label_smoothing=s.label_smoothing)
            (loss / s.grad_accum).backward()
        total += loss.detach()
    # clip with max_norm=inf only measures: the scale factor is clamped to exactly 1.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip if s.clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return D.mean(total / s.grad_accum, env), float(norm)


@torch.no_grad()
def _validation_loss(model: nn.Module, dataset: TokenDataset, s: TrainSettings, env: D.DistEnv, autocast) -> float:
    """Mean next-token cross-entropy (no label smoothing) over the validation windows, which the
    ranks split between them; the same windows as a single process with the same global batch."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for x, y in dataset.val_batches(s.seq_len, s.batch_size, s.eval_batches, rank=env.rank,
                                    world_size=env.world_size):
        x, y = x.to(env.device), y.to(env.device)
        with autocast():
            logits = model(x)
        total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total[1] += y.numel()
    model.train()
    if env.distributed:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


def _full_model(wrapped: nn.Module, cfg: ModelConfig, env: D.DistEnv, fsdp: bool) -> CausalLM | None:
    """The trained model as a plain module in eval mode (under FSDP rebuilt from gathered shards)."""
    if not (fsdp and env.distributed):
        return D.unwrap(wrapped).eval()
    state = D.model_state(wrapped)  # collective: every rank takes part
    if not env.is_main:
        return None
    model = build_model(cfg, torch.float32, init=False)
    model.load_state_dict(state, strict=True)
    return model.eval()
