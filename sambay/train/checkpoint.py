"""What a training run keeps on disk to be resumed, and the model it hands over at the end.

    OUT/run.json      the model config and settings of the run (written first, before any step)
    OUT/checkpoint/   model.safetensors (full fp32 weights), optimizer.safetensors (AdamW moments,
                      by parameter name) and trainer.json (step, settings, config, data
                      fingerprint, schedule, optimizer groups, the RNG states of every rank)
    OUT/model/        the final model as a Hugging Face folder, with the data's tokenizer

Both folders are written whole into a temporary folder and swapped in by rename, so a crash never
leaves half of one; `.checkpoint.old` is the last checkpoint while a new one is being swapped in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sambay.errors import SambayError
from sambay.files import atomic_write_text, read_json
from sambay.models import CausalLM
from sambay.runtime.checkpoint import save_model
from sambay.tokenizer import load_tokenizer
from sambay.train.dataset import TokenDataset

CHECKPOINT_FORMAT = "sambay-train-checkpoint"
CHECKPOINT_VERSION = 1
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
TRAINER_FILE = "trainer.json"


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; `.checkpoint.old` is one a crash left mid-swap."""
    for path in (out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old"):
        if (path / TRAINER_FILE).is_file():
            return path
    return None


def read_json_object(path: Path) -> dict[str, Any]:
    """run.json or a checkpoint's trainer.json: a JSON object, else a SambayError naming the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise SambayError(f"{path} does not hold a JSON object; it is damaged")
    return data


def read_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The trainer.json of a checkpoint, checked to be one this version of sambay reads."""
    meta = read_json_object(checkpoint / TRAINER_FILE)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version", 0) > CHECKPOINT_VERSION:
        raise SambayError(f"{checkpoint} is not a sambay training checkpoint this version reads")
    return meta


def write_run_file(out: Path, record: dict[str, Any]) -> None:
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=1) + "\n")


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
    (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
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


def export(model: CausalLM, folder: Path, dataset: TokenDataset) -> Path:
    """Write the model as a Hugging Face folder (plus the data's tokenizer), swapped in whole."""
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


def _copy_tokenizer(dataset: TokenDataset, folder: Path) -> None:
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
        load_tokenizer(source).save(folder)
    except Exception as e:  # noqa: BLE001 - the model is still usable; say what is missing
        print(f"sambay train: note: could not save the tokenizer {source!r} with the model ({e}); "
              f"copy its files into {folder.name}/ by hand", file=sys.stderr)
