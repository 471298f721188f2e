"""`TokenDataset`: a prepared token folder served as batches of packed fixed-length sequences.

The shards are opened lazily with memory maps. The global batch of training step s depends only
on (seed, s), so a run resumed at `start_step` sees exactly what an uninterrupted run would have,
and each rank of a data-parallel run takes its own disjoint rows of that global batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sambay.errors import SambayError
from sambay.train.manifest import SPLITS, read_manifest


class TokenDataset:
    """A prepared token folder, opened lazily (memory maps; nothing is read until asked for).

    Sequences are packed: a split's token stream is cut into windows of seq_len+1 tokens that
    start every seq_len tokens (window i = tokens [i*seq_len, (i+1)*seq_len]), x is a window's
    first seq_len tokens and y the last seq_len. Training visits the windows in a fresh random
    order every epoch.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.manifest: dict[str, Any] = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_token_id = manifest.get("eos_token_id")
        self._files: dict[str, list[Path]] = {}
        self._offsets: dict[str, np.ndarray] = {}
        for split in SPLITS:
            info = manifest["splits"].get(split, {"shards": []})
            files = [self.path / s["file"] for s in info["shards"]]
            for file in files:
                if not file.is_file():
                    raise SambayError(f"shard {file} is missing; prepare the data again")
            self._files[split] = files
            self._offsets[split] = np.cumsum([0] + [int(s["num_tokens"]) for s in info["shards"]])
        self._shards: dict[tuple[str, int], np.ndarray] = {}
        self._perms: dict[tuple[str, int, int, int], np.ndarray] = {}

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, train={self.num_tokens('train')}, "
                f"val={self.num_tokens('val')}, dtype={self.dtype.name})")

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer saved with the data (`prepare --train-tokenizer`), if any."""
        rel = self.manifest.get("tokenizer", {}).get("path")
        return self.path / rel if rel else None

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise SambayError(f"unknown split {split!r}; use 'train' or 'val'")

    def num_tokens(self, split: str = "train") -> int:
        self._check_split(split)
        return int(self._offsets[split][-1])

    def num_windows(self, split: str, seq_len: int) -> int:
        """How many sequences of seq_len (+1 for the shifted targets) the split holds."""
        self._check_split(split)
        return max(0, (self.num_tokens(split) - 1) // seq_len)

    def _shard(self, split: str, index: int) -> np.ndarray:
        key = (split, index)
        if key not in self._shards:
            file = self._files[split][index]
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SambayError(f"shard {file} could not be read ({e}); prepare the data again") from e
            expected = int(self._offsets[split][index + 1] - self._offsets[split][index])
            if arr.ndim != 1 or arr.shape[0] != expected or arr.dtype != self.dtype:
                raise SambayError(f"shard {file} is damaged (holds {arr.shape} {arr.dtype}, the manifest "
                                  f"says {expected} {self.dtype}); prepare the data again")
            self._shards[key] = arr
        return self._shards[key]

    def tokens(self, split: str, start: int, end: int) -> np.ndarray:
        """A copy of tokens [start, end) of a split (across shard boundaries), as int64."""
        self._check_split(split)
        n = self.num_tokens(split)
        if not 0 <= start <= end <= n:
            raise SambayError(f"token range [{start}, {end}) is outside the {split} split ({n} tokens)")
        offsets = self._offsets[split]
        out = np.empty(end - start, dtype=np.int64)
        pos = start
        index = int(np.searchsorted(offsets, start, side="right")) - 1
        while pos < end:
            shard = self._shard(split, index)
            lo = pos - int(offsets[index])
            take = min(end - pos, shard.shape[0] - lo)
            out[pos - start:pos - start + take] = shard[lo:lo + take]
            pos += take
            index += 1
        return out

    def _windows(self, split: str, windows: Sequence[int] | np.ndarray, seq_len: int):
        rows = np.stack([self.tokens(split, int(w) * seq_len, int(w) * seq_len + seq_len + 1)
                         for w in windows])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _need_windows(self, split: str, seq_len: int) -> int:
        if int(seq_len) < 1:
            raise SambayError(f"sequence length must be at least 1, got {seq_len}")
        n = self.num_tokens(split)
        if split == "val" and n == 0:
            raise SambayError(f"{self.path} has no validation tokens; prepare it with a val fraction > 0")
        count = self.num_windows(split, seq_len)
        if count == 0:
            raise SambayError(f"sequence length {seq_len} is longer than the data: the {split} split of "
                              f"{self.path} has {n} tokens and a sequence needs {seq_len + 1}; use a "
                              "shorter --seq-len or more text")
        return count

    def _epoch_permutation(self, split: str, count: int, seed: int, epoch: int) -> np.ndarray:
        key = (split, count, seed, epoch)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
            perm = rng.permutation(count)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    @staticmethod
    def _check_layout(batch_size: int, rank: int, world_size: int) -> None:
        if int(batch_size) < 1:
            raise SambayError(f"batch size must be at least 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise SambayError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")

    def batch_at(self, step: int, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train"):
        """(x, y) of one training step for one rank: int64 tensors of shape [batch_size, seq_len].

        The global batch of step s is rows [s*G, (s+1)*G) of an endless sequence of windows that
        visits every window once per epoch in an order drawn from (seed, epoch); G =
        batch_size * world_size and rank r takes rows [r*batch_size, (r+1)*batch_size) of it.
        """
        self._check_split(split)
        self._check_layout(batch_size, rank, world_size)
        if int(step) < 0 or int(seed) < 0:
            raise SambayError(f"step and seed must not be negative (step {step}, seed {seed})")
        count = self._need_windows(split, seq_len)
        first = int(step) * batch_size * world_size + rank * batch_size
        windows = []
        for q in range(first, first + batch_size):
            epoch, pos = divmod(q, count)
            windows.append(self._epoch_permutation(split, count, int(seed), epoch)[pos])
        return self._windows(split, windows, seq_len)

    def batches(self, split: str = "train", seq_len: int = 256, batch_size: int = 8, *, rank: int = 0,
                world_size: int = 1, start_step: int = 0, seed: int = 0):
        """Endless (x, y) batches for steps start_step, start_step+1, ... (see `batch_at`).

        Arguments are checked here, before the first batch is asked for. Within an epoch no two
        ranks get the same window at a step; only when a global batch is larger than the whole
        split can a window come twice (from two epochs).
        """
        self._check_split(split)
        self._check_layout(batch_size, rank, world_size)
        if int(start_step) < 0 or int(seed) < 0:
            raise SambayError(f"start_step and seed must not be negative ({start_step}, {seed})")
        self._need_windows(split, seq_len)

        def gen():
            step = int(start_step)
            while True:
                yield self.batch_at(step, seq_len, batch_size, rank=rank, world_size=world_size,
                                    seed=seed, split=split)
                step += 1

        return gen()

    def val_batches(self, seq_len: int, batch_size: int, max_batches: int | None = None, *,
                    rank: int = 0, world_size: int = 1):
        """The fixed validation set: windows in order, rank r taking every world_size-th one.

        Every rank gets the same number of windows (up to world_size-1 trailing windows are left
        out); the last batch may be smaller than batch_size. `max_batches` caps the batches per rank.
        """
        self._check_layout(batch_size, rank, world_size)
        count = self._need_windows("val", seq_len)
        if count < world_size:
            raise SambayError(f"the validation split has only {count} sequences of length {seq_len}, "
                              f"fewer than the {world_size} ranks; use a larger val fraction")
        mine = np.arange(rank, count - count % world_size, world_size)
        n_batches = math.ceil(len(mine) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max(0, int(max_batches)))

        def gen():
            for b in range(n_batches):
                yield self._windows("val", mine[b * batch_size:(b + 1) * batch_size], seq_len)

        return gen()
