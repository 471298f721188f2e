"""`sambay train`: pretrain a SambaY model (or the Phi3 Transformer baseline, e.g. `--preset
small-phi3`) on a prepared token folder, on one or many processes.

    sambay prepare --builtin classics --train-tokenizer 4096 --out data/classics
    sambay train --preset small --data data/classics --out runs/small --steps 2000 --seq-len 256
    sambay train --data data/classics --out runs/small --resume          # continue where it stopped
    torchrun --standalone --nproc_per_node 2 -m sambay.cli train ...      # data-parallel (DDP)
    torchrun --standalone --nproc_per_node 2 -m sambay.cli train ... --fsdp   # sharded (FSDP2)

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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sambay.train import distributed as D
from sambay.models.config import PRESETS, ModelConfig, config_from_dict, load_config, preset
from sambay.errors import SambayError
from sambay.files import atomic_write_text
from sambay.models.sambay import CausalLM, build_model
from sambay.train.log import Metrics, Progress

CHECKPOINT_FORMAT = "sambay-train-checkpoint"
CHECKPOINT_VERSION = 1
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"

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


@dataclass
class TrainResult:
    model: CausalLM | None  # the trained model in eval mode (None on ranks > 0 under FSDP)
    step: int
    losses: list[float]  # training loss of each step this call ran
    val_loss: float | None
    stopped_by: int | None  # the signal that stopped the run early, if any
    out: Path


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay for matrices (projections, conv kernels, the tied embedding/LM head); none for
    norms, biases, the SSM's A_log and D, and the differential-attention lambdas."""
    return p.dim() >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_LEAVES


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Linux /proc/cpuinfo flags; True where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


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


# ---------------------------------------------------------------------------------------------
# Resolving what to run, and every check that can fail before work starts
# ---------------------------------------------------------------------------------------------


def apply_overrides(cfg: ModelConfig, overrides: list[str] | tuple[str, ...]) -> ModelConfig:
    """`key=value` changes to the model config (value parsed as JSON, else taken as a string)."""
    fields = {f.name for f in dataclasses.fields(cfg)} - {"extra"}
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise SambayError(f"--override {item!r}: expected KEY=VALUE with KEY a config field "
                              f"({', '.join(sorted(fields))})")
        try:
            changes[key] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key] = raw
    return cfg.replace(**changes) if changes else cfg


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """What identifies the token data (not where it lives or when it was prepared)."""
    keys = ("dtype", "vocab_size", "eos_token_id", "num_tokens", "splits", "val_ranges")
    ident = {k: manifest.get(k) for k in keys}
    ident["sources"] = [s.get("sha256") for s in manifest.get("sources") or []]
    ident["tokenizer"] = (manifest.get("tokenizer") or {}).get("sha256")
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; `.checkpoint.old` is one a crash left mid-swap."""
    for path in (out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old"):
        if (path / "trainer.json").is_file():
            return path
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SambayError(f"{path} could not be read ({e}); it is damaged") from None
    if not isinstance(data, dict):
        raise SambayError(f"{path} does not hold a JSON object; it is damaged")
    return data


def _differences(mine: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    mine = json.loads(json.dumps(mine))  # compare as JSON would store it (tuples -> lists, ...)
    return [f"{k}: {saved.get(k)!r} in the run, {mine.get(k)!r} now"
            for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)]


@dataclass
class Plan:
    cfg: ModelConfig
    settings: TrainSettings
    dataset: Any
    data_dir: Path
    out: Path
    fingerprint: str
    checkpoint: Path | None
    meta: dict[str, Any] | None  # trainer.json of the checkpoint
    notes: list[str]


def plan_run(data: str | os.PathLike, out: str | os.PathLike, config: ModelConfig | None,
             resume: bool, given: dict[str, Any], attention_dropout: float | None,
             overrides: list[str] | tuple[str, ...], world_size: int, preset_name: str | None) -> Plan:
    """Everything a run needs, checked: raises SambayError before any model is built."""
    from sambay.train.data import TokenDataset

    notes: list[str] = []
    unknown = sorted(set(given) - set(SETTING_NAMES))
    if unknown:
        raise SambayError(f"unknown training setting(s): {', '.join(unknown)}")
    data_dir = Path(data)
    if not data_dir.is_dir():
        raise SambayError(f"data folder {data_dir} does not exist; make one with `sambay prepare`")
    dataset = TokenDataset(data_dir)
    if dataset.num_tokens("train") == 0:
        raise SambayError(f"{data_dir} holds no training tokens (the corpus is empty); prepare it "
                          "again from non-empty text")
    fingerprint = data_fingerprint(dataset.manifest)

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SambayError(f"--out {out} exists and is not a folder")
    checkpoint = find_checkpoint(out) if out.is_dir() else None
    run_file = out / RUN_FILE
    saved: dict[str, Any] | None = None
    meta = None
    has_run = checkpoint is not None or run_file.is_file()
    if has_run and not resume:
        raise SambayError(f"{out} already holds a training run; pass --resume to continue it, or "
                          "choose a new --out")
    if not has_run and out.is_dir() and any(out.iterdir()):
        raise SambayError(f"{out} is not empty and holds no training run; choose a new or empty --out")
    if resume and checkpoint is not None:
        meta = _read_json(checkpoint / "trainer.json")
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version", 0) > CHECKPOINT_VERSION:
            raise SambayError(f"{checkpoint} is not a sambay training checkpoint this version reads")
        saved = meta
    elif resume and has_run:
        saved = _read_json(run_file)
        notes.append(f"{out} has no checkpoint yet; starting the run from step 0")
    elif resume:
        notes.append(f"nothing to resume in {out}; starting a new run")

    # Settings: given flags over the run's saved ones over the defaults.
    if saved is not None:
        clash = [f"--{k.replace('_', '-')} {given[k]!r} (the run used {saved['settings'].get(k)!r})"
                 for k in TRAJECTORY if k in given and given[k] != saved["settings"].get(k)]
        if clash:
            raise SambayError(f"cannot resume {out} with different settings: {'; '.join(clash)}. Leave "
                              "them out to use the run's own, or start a new run with another --out")
        if saved.get("world_size") != world_size:
            raise SambayError(f"{out} was trained on {saved.get('world_size')} process(es), this is "
                              f"{world_size}; resume with the same number of processes")
        if saved.get("data") != fingerprint:
            raise SambayError(f"the tokens in {data_dir} are not the ones {out} was trained on; resume "
                              "with the same prepared data")
        base = {k: v for k, v in saved["settings"].items() if k in SETTING_NAMES}
        settings = TrainSettings(**{**base, **given}).resolved()
    else:
        settings = TrainSettings(**given).resolved()
    settings.check()

    # Model config: --config/--preset, else the run's own; then the flags that change it.
    if config is None:
        if saved is None:
            raise SambayError("give the model with --config FILE or --preset NAME "
                              f"({', '.join(PRESETS)})")
        config = config_from_dict(saved["config"], f"{out}/run.json")
    elif preset_name is not None:  # a preset adopts the data's vocabulary and end-of-text token
        changes: dict[str, Any] = {}
        if dataset.vocab_size > config.vocab_size:
            changes["vocab_size"] = dataset.vocab_size
        eos = dataset.eos_token_id
        if eos is not None and config.eos_token_id != eos:
            changes.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        if changes:
            config = config.replace(**changes)
            notes.append(f"preset {preset_name}: set {', '.join(f'{k}={v}' for k, v in changes.items())} "
                         "to match the data's tokenizer")
    if attention_dropout is not None:
        if not 0 <= attention_dropout < 1:
            raise SambayError(f"--attention-dropout must be in [0, 1), got {attention_dropout}")
        config = config.replace(attention_dropout=float(attention_dropout))
    config = apply_overrides(config, overrides)
    if saved is not None:
        diff = _differences(config.to_dict(), saved["config"])
        if diff:
            raise SambayError(f"cannot resume {out} with a different model config ({'; '.join(diff)}); "
                              "resume without --config/--preset/--override, or start a new --out")
    if dataset.vocab_size > config.vocab_size:
        raise SambayError(f"the data's tokenizer has {dataset.vocab_size} tokens but the model's "
                          f"vocab_size is {config.vocab_size}; use --override vocab_size="
                          f"{dataset.vocab_size} (or a larger one)")

    # The data must hold at least one sequence (batches() raises a clear error otherwise).
    dataset.batches("train", settings.seq_len, settings.batch_size, world_size=world_size)
    if settings.eval_every:
        if dataset.num_tokens("val") == 0:
            raise SambayError(f"{data_dir} has no validation split; pass --eval-every 0 to train "
                              "without validation, or prepare with --val-fraction > 0")
        dataset.val_batches(settings.seq_len, settings.batch_size, settings.eval_batches,
                            world_size=world_size)
    return Plan(config, settings, dataset, data_dir, out, fingerprint, checkpoint, meta, notes)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(out: Path, model_state: dict[str, torch.Tensor],
                     optim_tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write OUT/checkpoint as a whole: into a temp folder, then swapped in by two renames."""
    tmp, final, old = out / f".{CHECKPOINT_DIR}.tmp", out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_file(optim_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # a crash from here to the next rename leaves `old` to resume from
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(out)
    return final


def read_checkpoint_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError, ValueError) as e:
        raise SambayError(f"{path / name} could not be read ({e}); the checkpoint is damaged") from None


# ---------------------------------------------------------------------------------------------
# Stopping on a signal
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


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
            atomic_write_text(out / RUN_FILE, json.dumps(
                {"config": cfg.to_dict(), "settings": dataclasses.asdict(s), "world_size": env.world_size,
                 "data": plan.fingerprint, "data_dir": str(plan.data_dir.absolute())}, indent=1) + "\n")

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
def _validation_loss(model: nn.Module, dataset: Any, s: TrainSettings, env: D.DistEnv, autocast) -> float:
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


def export(model: CausalLM, folder: Path, dataset: Any) -> Path:
    """Write the model as a Hugging Face folder (plus the data's tokenizer), swapped in whole."""
    from sambay.runtime.checkpoint import save_model

    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    _copy_tokenizer(dataset, tmp)
    old = folder.parent / f".{folder.name}.old"
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _copy_tokenizer(dataset: Any, folder: Path) -> None:
    """The tokenizer the data was made with: its saved folder, or the one it names (e.g. phi4)."""
    tok_dir = dataset.tokenizer_dir
    if tok_dir is not None and tok_dir.is_dir():
        for f in tok_dir.iterdir():
            if f.is_file() and f.name not in ("config.json", "generation_config.json"):
                shutil.copy2(f, folder / f.name)
        return
    source = (dataset.manifest.get("tokenizer") or {}).get("source")
    if not source:
        return
    try:
        from sambay.tokenizer import load_tokenizer

        load_tokenizer(source).save(folder)
    except Exception as e:  # noqa: BLE001 - the model is still usable; say what is missing
        print(f"sambay train: note: could not save the tokenizer {source!r} with the model ({e}); "
              f"copy its files into {folder.name}/ by hand", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a SambaY (or baseline Transformer) model on prepared token shards",
        description="Train a SambaY model, or the Phi3 Transformer baseline (AdamW, warmup + cosine, clipping, accumulation) on a folder "
                    "made by `sambay prepare`. Under torchrun it trains data-parallel (DDP, or FSDP2 "
                    "with --fsdp). Flags left out on --resume come from the checkpoint.",
    )
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
