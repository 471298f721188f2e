"""Resolving what a `sambay train` call runs, with every check that can fail before work starts.

`plan_run` turns the data folder, the run folder, the model config and the settings given into a
`Plan`: the settings are the given ones over the run's saved ones (on --resume) over the defaults,
the model config is --config/--preset (a preset adopting the data's vocabulary) or the run's own,
then changed by --attention-dropout and --override. Whatever does not fit (a run folder in use,
a resume with other settings, other data or another number of processes, data too short for one
sequence) raises SambayError before any model is built or any file written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sambay.errors import SambayError
from sambay.models import PRESETS, ModelConfig
from sambay.models.config import config_from_dict  # not exported by sambay.models
from sambay.train.checkpoint import RUN_FILE, find_checkpoint, read_checkpoint, read_json_object
from sambay.train.dataset import TokenDataset
from sambay.train.manifest import data_fingerprint
from sambay.train.settings import SETTING_NAMES, TRAJECTORY, TrainSettings


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


def _differences(mine: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    mine = json.loads(json.dumps(mine))  # compare as JSON would store it (tuples -> lists, ...)
    return [f"{k}: {saved.get(k)!r} in the run, {mine.get(k)!r} now"
            for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)]


@dataclass
class Plan:
    """A checked run: what `train` builds, loads and runs."""

    cfg: ModelConfig
    settings: TrainSettings
    dataset: TokenDataset
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
        saved = meta = read_checkpoint(checkpoint)
    elif resume and has_run:
        saved = read_json_object(run_file)
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
