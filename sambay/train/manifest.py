"""The on-disk format of a prepared token folder, shared by its writer (`prepare`) and its reader
(`TokenDataset`).

A folder holds numpy `.npy` shards per split (`train_000000.npy`, ..., `val_000000.npy`, ...) of
uint16 ids when the vocabulary fits, else uint32, and `manifest.json`, which says what they hold:
dtype, vocabulary, end-of-text id, the shards of each split, where the validation chunks lay in the
token stream, the tokenizer and the sources (with their sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sambay.errors import SambayError

FORMAT = "sambay-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIRNAME = "tokenizer"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise SambayError(f"the tokenizer's vocab_size must be positive, got {vocab_size}")
    if vocab_size >= 2**32:
        raise SambayError(f"vocab_size {vocab_size} does not fit in 32-bit token ids")
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a prepared token folder; SambayError saying what to do otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise SambayError(f"{folder} is not a prepared token folder (no {MANIFEST_NAME}); "
                          "make one with `sambay prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        # Not sambay.files.read_json: its advice (restore or download the file) does not fit data
        # that `sambay prepare` can simply make again.
        raise SambayError(f"{path} could not be read ({e}); prepare the data again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SambayError(f"{path} is not a sambay token manifest; prepare the data again")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SambayError(f"{path} has format version {manifest.get('format_version')}, newer "
                          f"than this sambay understands ({FORMAT_VERSION}); upgrade sambay")
    return manifest


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """What identifies the token data (not where it lives or when it was prepared)."""
    keys = ("dtype", "vocab_size", "eos_token_id", "num_tokens", "splits", "val_ranges")
    ident = {k: manifest.get(k) for k in keys}
    ident["sources"] = [s.get("sha256") for s in manifest.get("sources") or []]
    ident["tokenizer"] = (manifest.get("tokenizer") or {}).get("sha256")
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
