"""A prefix-state cache: snapshots of a row's decode state after a token prefix, so a request whose
prompt starts with a cached prefix restores it and prefills only the rest.

    cache = PrefixCache(budget_bytes=256 << 20)
    engine = Engine(model, tokenizer, prefix_cache=cache)   # the Engine makes one by default

Why it is cheap for SambaY: after a prefix, its decode state is the Mamba conv/SSM states and the
sliding-window rings (fixed size) plus the one shared K/V up to that point, so a snapshot is small
next to the prefill it saves. (The Phi3 baseline keeps K/V in every layer: its snapshots are larger
but work the same way.) A snapshot is taken at every `block` boundary of a prefill (the engine's
chunks end there, so a restore there continues with the chunks a fresh prefill would run), at the
end of a prompt (with the last position's logits, so an identical prompt needs no prefill at all)
and when a request leaves (prompt + generated tokens: the next turn of a chat starts with them).

Entries are keyed by the token prefix and by the identity of the model and its settings
(`model_identity`): a snapshot is only ever restored into a state of the very same model object,
dtype and operations. The cache is an LRU under a byte budget; an entry bigger than the budget is
not kept.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sambay.errors import SambayError
from sambay.models.state import DecodeState

PREFIX_CACHE_MB = 256  # default budget of the Engine's and the server's cache
BLOCK = 512  # snapshot interval (tokens); the engine's prefill chunks end at its multiples

_serials = itertools.count()
_model_serials: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_serial_lock = threading.Lock()


def model_identity(model) -> tuple:
    """What a snapshot is valid for: this model object (a serial number never reused, even if the
    object's id is), its class and source, the dtypes of its weights and its operations."""
    with _serial_lock:
        serial = _model_serials.get(model)
        if serial is None:
            serial = _model_serials[model] = next(_serials)
    dtypes = sorted({str(t.dtype) for t in itertools.chain(model.parameters(), model.buffers())})
    ops = model.ops
    return (serial, type(model).__name__, model.source, tuple(dtypes), type(ops).__name__,
            getattr(ops, "level", None))


def snapshot_bytes(snap: dict) -> int:
    tensors = [t for name in ("conv", "ssm", "k", "v") for t in snap[name] if t is not None]
    tensors.append(snap["valid"])
    if snap.get("logits") is not None:
        tensors.append(snap["logits"])
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Entry:
    identity: tuple
    tokens: tuple[int, ...]
    snap: dict  # DecodeState.snapshot_row, plus "logits" (V,) after the last token, or None
    nbytes: int

    @property
    def length(self) -> int:
        return len(self.tokens)


class PrefixCache:
    """LRU of row snapshots under `budget_bytes`; counts hits, misses and the bytes it holds.
    Thread-safe (the server reads its counters from the event loop)."""

    def __init__(self, budget_bytes: int, block: int = BLOCK):
        if budget_bytes < 0 or block < 1:
            raise SambayError(f"the prefix cache needs a budget >= 0 and a block >= 1, got {budget_bytes}, {block}")
        self.budget, self.block = int(budget_bytes), int(block)
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()  # (identity, tokens) -> Entry
        self._lock = threading.Lock()
        self.hits = self.misses = self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens restored instead of prefilled

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, identity: tuple, tokens: Sequence[int], state: DecodeState, count: bool = True
               ) -> Entry | None:
        """The entry of the longest cached prefix of `tokens` that `state` can take: shorter than
        `tokens`, or all of them if it has their logits. count=False peeks (no hit or miss)."""
        tokens = list(tokens)
        with self._lock:
            best = None
            for e in self._entries.values():
                n = e.length
                if e.identity != identity or n > len(tokens) or (best is not None and n <= best.length):
                    continue
                if n == len(tokens) and e.snap.get("logits") is None:
                    continue
                if list(e.tokens) == tokens[:n] and state.can_restore(e.snap):
                    best = e
            if count:
                if best is None:
                    self.misses += 1
                else:
                    self.hits += 1
                    self.hit_tokens += best.length
                    self._entries.move_to_end((best.identity, best.tokens))
            return best

    def store(self, identity: tuple, tokens: Sequence[int], snap: dict) -> None:
        """Keep `snap` as the state after `tokens` (evicting the least recently used beyond the budget)."""
        key = (identity, tuple(int(t) for t in tokens))
        nbytes = snapshot_bytes(snap)
        with self._lock:
            old = self._entries.get(key)
            if old is not None:  # keep the one with logits
                if old.snap.get("logits") is None and snap.get("logits") is not None:
                    self._drop(key)
                else:
                    self._entries.move_to_end(key)
                    return
            if nbytes > self.budget:
                return
            self._entries[key] = Entry(identity, key[1], snap, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.budget:
                self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _drop(self, key: tuple) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes": self.nbytes,
                    "entries": len(self._entries), "hit_tokens": self.hit_tokens, "budget": self.budget}


class RowPrefill:
    """Prefills one prompt into row `row` of `state`, possibly a few tokens at a time (`run(budget)`),
    so a scheduler can interleave a long prompt with decode steps.

    It restores the longest cached prefix first, then runs the rest in chunks that end at multiples
    of `chunk` (as a fresh prefill from position 0 does), snapshotting at the cache's block
    boundaries and at the end. `logits` (V,) holds the next token's logits once `done`.
    """

    def __init__(self, model, state: DecodeState, row: int, prompt: Sequence[int], chunk: int,
                 cache: PrefixCache | None):
        self.model, self.state, self.row, self.prompt = model, state, row, list(prompt)
        self.view = state.rows(row)
        self.view.reset()
        self.logits: torch.Tensor | None = None
        whole = getattr(model, "prefill_whole", None)  # a family whose result depends on chunking
        self.whole = whole is not None and whole(len(self.prompt))
        self.chunk = len(self.prompt) if self.whole else chunk
        self.cache = None if self.whole else cache
        self.identity = model_identity(model) if self.cache is not None else None
        self.position = 0
        entry = None if self.cache is None else self.cache.lookup(self.identity, self.prompt, state)
        if entry is not None:
            state.restore_row(row, entry.snap)
            self.position = entry.length
            if entry.length == len(self.prompt):
                self.logits = entry.snap["logits"].clone()
        self.cached = self.position  # prompt tokens restored from the cache

    @property
    def done(self) -> bool:
        return self.logits is not None

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.position

    @torch.no_grad()
    def run(self, budget: int | None = None) -> int:
        """Prefill up to `budget` more tokens (None: all). Returns how many it ran."""
        start, n = self.position, len(self.prompt)
        ids = torch.tensor([self.prompt], dtype=torch.long)
        logits = None
        while self.position < n and (budget is None or self.position - start < budget):
            end = min(n, (self.position // self.chunk + 1) * self.chunk)
            if budget is not None:
                end = min(end, start + budget)
            logits = self.model(ids[:, self.position:end], state=self.view)
            self.position = end
            if self.cache is not None and end < n and end % self.cache.block == 0:
                self.cache.store(self.identity, self.prompt[:end], self.state.snapshot_row(self.row))
        if self.position == n and logits is not None:
            self.logits = logits[0, -1]
            if self.cache is not None:
                snap = self.state.snapshot_row(self.row)
                snap["logits"] = self.logits.clone()
                self.cache.store(self.identity, self.prompt, snap)
        return self.position - start


def store_row(cache: PrefixCache | None, model, state: DecodeState, row: int, tokens: Sequence[int],
              logits: torch.Tensor | None = None) -> None:
    """Snapshot row `row`, which holds `tokens` (and, if given, the logits after them), into `cache`."""
    if cache is None or cache.budget == 0 or not tokens or int(state.lengths[row]) != len(tokens):
        return
    snap = state.snapshot_row(row)
    snap["logits"] = None if logits is None else logits.clone()
    cache.store(model_identity(model), tokens, snap)
