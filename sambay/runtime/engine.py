"""Generation: a request-level engine over one preallocated decode state, and the helpers on top.

    engine = Engine(model, max_batch_size=4)
    req = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))  # prefills its row
    while engine.num_active:
        for ev in engine.step():  # one batched decode call for every active request
            print(ev.request_id, ev.token_id, ev.finish_reason)

The engine works on token ids only; text (incremental detokenizing, stop strings) is the thin
`TextStream` layer, which needs a tokenizer. `generate()` is the batch API on ids.

How the decode state is used. Each request owns one row ("slot") of the state. A new request is
prefilled alone through `state.rows(slot)`, in chunks of `prefill_chunk` tokens, so ragged prompts
waste nothing on padding and a long prompt never needs more than one chunk's activations. The
active requests always sit in rows 0..n-1: when one finishes, the last active row is moved into
its place, so every decode step is one call on `state.rows(slice(0, n))` and finished requests
cost nothing. Rows may sit at different lengths: positions are kept per row (SambaY has no
positional encoding; the Phi3 baseline rotates each row by its own positions), so this is exact.

A step samples every active request's next token from the logits it holds, reports it, and feeds
the tokens of the requests that go on through the model in one call. A request that ends is never
fed its last token.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sambay.errors import SambayError
from sambay.runtime.prefix_cache import PREFIX_CACHE_MB, PrefixCache, RowPrefill, store_row
from sambay.runtime.sampling import SamplingParams, TokenCounts, sample, token_logprobs
from sambay.runtime.text import TextStream

PREFILL_CHUNK = 512


def default_stop_ids(model) -> list[int]:
    """The model's end-of-sequence ids: generation_config.json's eos_token_id, else config.json's."""
    eos = model.generation_config.get("eos_token_id")
    if eos is None:
        return list(model.config.eos_token_ids)
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def text_stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a text reply: the model's end-of-sequence ids, then the tokenizer's (a chat
    template may end its turns with one, like <|end|>), each once and in that order."""
    return list(dict.fromkeys([*default_stop_ids(model), *getattr(tokenizer, "eos_token_ids", [])]))


def pad_id(model) -> int:
    cfg = model.config
    if cfg.pad_token_id is not None:
        return int(cfg.pad_token_id)
    stops = default_stop_ids(model)
    return stops[0] if stops else 0


def check_context(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise SambayError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                          f"{prompt_len + max_new_tokens} tokens exceeds the model's context of "
                          f"{limit}; shorten the prompt or lower max_new_tokens")


# ---------------------------------------------------------------------------------------------
# Requests, events, stats
# ---------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Timing of one request (or of a whole batch in `generate`)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache or shared with another request

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tok | generated {self.generated_tokens} tok | "
                f"prefill {self.prefill_tokens_per_second:.1f} tok/s | "
                f"decode {self.decode_tokens_per_second:.1f} tok/s")

    def as_dict(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class Event:
    """One generated token of one request. `finished` is set on the request's last event;
    finish_reason is "stop" (a stop id, or a stop string found by the text layer) or "length"."""

    request_id: Any
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Request:
    """One request's bookkeeping. finish_reason: None while running, then "stop", "length" or
    "cancelled". `slot` is its row in the engine's state (-1 once it left)."""

    request_id: Any
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    counts: TokenCounts | None
    slot: int = -1
    prefill: RowPrefill | None = None  # while begun and not yet prefilled (Engine.begin_request)
    logits: torch.Tensor | None = None  # (V,) logits for the next token
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: Stats = field(default_factory=Stats)
    # Tokens to emit next instead of sampling, queued by a per-request hook (a spent thinking budget
    # forces "</think>"); each is reported, counted and fed like a sampled one.
    forced: deque[int] = field(default_factory=deque)
    matcher: Any = None  # params.grammar's state for this request: masks its row only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class Engine:
    """Runs requests on one model, batching their decode steps over a preallocated state.

    max_batch_size: rows of the state (requests decoded together). max_length: tokens per row
    (prompt + output); None sizes the state on the first request and grows it later whenever the
    engine is idle and a request needs more, up to the model's context. prefill_chunk: prompt
    tokens per prefill call. prefix_cache_mb: budget of the prefix-state cache (0 turns it off,
    see sambay.runtime.prefix_cache): a prompt starting with a prefix seen before (the history of
    a chat, a shared system prompt) restores it and prefills only the rest. A scheduler drives it
    with add_request / step / cancel, or begin_request / prefill to prefill a prompt in pieces.
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 1, max_length: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, prefix_cache_mb: float = PREFIX_CACHE_MB):
        if max_batch_size < 1:
            raise SambayError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_length is not None and max_length > model.config.max_position_embeddings:
            raise SambayError(f"max_length {max_length} is beyond the model's context of "
                              f"{model.config.max_position_embeddings} tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.prefill_chunk = prefill_chunk
        self.stop_ids = default_stop_ids(model)
        self.state = None if max_length is None else model.new_state(max_batch_size, max_length)
        self.active: list[Request] = []  # active[i] sits in row i of the state
        self.pending: list[Request] = []  # begun, still prefilling (each in a staging row of its own)
        self.prefix_cache = (PrefixCache(int(prefix_cache_mb * 2**20), block=prefill_chunk)
                             if prefix_cache_mb > 0 else None)
        self._ids = itertools.count()

    # ---- scheduler API ---------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.active) - len(self.pending)

    @torch.no_grad()
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams | None = None,
                    request_id: Any = None) -> Request:
        """Prefill a new request into a free row; its first token comes with the next step()."""
        req = self._new_request(prompt_ids, params, request_id)
        req.slot = len(self.active)
        start = time.perf_counter()
        job = RowPrefill(self.model, self.state, req.slot, req.prompt_ids, self.prefill_chunk, self.prefix_cache)
        job.run()
        self._joined(req, job)
        req.stats.prefill_seconds = time.perf_counter() - start
        return req

    @torch.no_grad()
    def begin_request(self, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams | None = None,
                      request_id: Any = None) -> Request:
        """Take a row for a new request without prefilling it yet: call prefill(req, budget) until
        it returns True (the request then decodes with the next step()). A scheduler uses this to
        run a long prompt a chunk at a time between decode steps."""
        req = self._new_request(prompt_ids, params, request_id)
        staging = self.model.new_state(1, self.state.max_length)  # one row, the batch's layout
        req.prefill = RowPrefill(self.model, staging, 0, req.prompt_ids, self.prefill_chunk, self.prefix_cache)
        req.stats.prefill_seconds = 0.0
        self.pending.append(req)
        return req

    @torch.no_grad()
    def prefill(self, req: Request, budget: int | None = None) -> bool:
        """Prefill up to `budget` more prompt tokens of a begun request (None: all of them). True
        once it has joined the batch."""
        start = time.perf_counter()
        job = req.prefill
        job.run(budget)
        req.stats.prefill_seconds += time.perf_counter() - start
        if not job.done:
            return False
        self.pending.remove(req)
        req.prefill, req.slot = None, len(self.active)
        self.state.restore_row(req.slot, job.state.snapshot_row(0))
        self._joined(req, job)
        return True

    @torch.no_grad()
    def fork(self, source: Request, params: SamplingParams | None = None, request_id: Any = None) -> Request:
        """A new request on the prompt of active request `source`, which has not decoded yet: its
        row is copied instead of prefilled (n > 1 choices, identical prompts arriving together)."""
        if source not in self.active or source.output_ids:
            raise SambayError("fork needs an active request that has not generated yet")
        req = self._new_request(source.prompt_ids, params, request_id)
        req.slot = len(self.active)
        self.state.copy_row(source.slot, req.slot)
        req.logits = source.logits.clone()
        req.stats.prompt_tokens = req.stats.cached_tokens = len(req.prompt_ids)
        self.active.append(req)
        return req

    def _joined(self, req: Request, job: RowPrefill) -> None:
        req.logits = job.logits
        req.stats.prompt_tokens, req.stats.cached_tokens = len(req.prompt_ids), job.cached
        self.active.append(req)

    def _new_request(self, prompt_ids, params: SamplingParams | None, request_id: Any) -> Request:
        """Check a new request and make its bookkeeping (the state is sized for it)."""
        params = (params or SamplingParams()).validate()
        prompt = [int(i) for i in torch.as_tensor(prompt_ids).flatten().tolist()]
        if not prompt:
            raise SambayError("the prompt is empty; generation needs at least one prompt token")
        V = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= V:
            raise SambayError(f"prompt token ids must be in [0, {V}), got {min(prompt)}..{max(prompt)}")
        if request_id is not None and any(r.request_id == request_id for r in self.active + self.pending):
            raise SambayError(f"request id {request_id!r} is already active; give each request its own id")
        if not self.free_slots:
            raise SambayError(f"the engine is full ({self.max_batch_size} active requests); wait for "
                              f"one to finish or make the Engine with a larger max_batch_size")
        check_context(self.model, len(prompt), params.max_new_tokens)
        self._ensure_capacity(len(prompt) + params.max_new_tokens)
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.stop_ids
        req = Request(request_id=next(self._ids) if request_id is None else request_id,
                      prompt_ids=prompt, params=params, stop_ids=frozenset(stop_ids),
                      generator=params.make_generator(),
                      counts=TokenCounts(V, prompt) if params.penalized else None,
                      matcher=params.grammar.new_matcher() if params.grammar is not None else None)
        return req

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Sample one token for every active request, then feed those that go on through the model
        in one batched call. Returns one Event per request that was active."""
        if not self.active:
            return []
        start = time.perf_counter()
        reqs = list(self.active)
        logits = torch.stack([r.logits for r in reqs])  # (n, V)
        ids = sample(logits, [r.params for r in reqs], [r.generator for r in reqs],
                     [r.counts for r in reqs], [r.matcher for r in reqs])
        events = []
        for i, (r, tok) in enumerate(zip(reqs, ids.tolist())):
            if r.forced:
                tok = r.forced.popleft()
                ids[i] = tok
            ev = Event(r.request_id, tok)
            if r.params.logprobs is not None:
                chosen, top_ids, top_lp = token_logprobs(logits[i:i + 1], ids[i:i + 1], r.params.logprobs)
                ev.logprob = float(chosen[0])
                ev.top_logprobs = list(zip(top_ids[0].tolist(), top_lp[0].tolist()))
            r.output_ids.append(tok)
            if r.counts is not None:
                r.counts.add(tok)
            if r.matcher is not None:
                r.matcher.accept(tok)
            if tok in r.stop_ids or (r.matcher is not None and r.matcher.terminated):
                r.finish_reason = "stop"
            elif len(r.output_ids) >= r.params.max_new_tokens:
                r.finish_reason = "length"
            ev.finished, ev.finish_reason = r.finished, r.finish_reason
            events.append(ev)
        for r in reqs:
            if r.finished:
                self._release(r)
        n = len(self.active)
        if n:
            tokens = torch.tensor([[r.output_ids[-1]] for r in self.active], dtype=torch.long)
            out = self.model(tokens, state=self.state.rows(slice(0, n)))  # (n, 1, V)
            for r, row_logits in zip(self.active, out[:, -1]):
                r.logits = row_logits
        elapsed = time.perf_counter() - start
        for r in reqs:
            r.stats.generated_tokens = len(r.output_ids)
            r.stats.decode_seconds += elapsed
        return events

    def cancel(self, request: Request | Any) -> bool:
        """Stop a request and free its row. Returns False if it was not active."""
        for r in self.pending:
            if r is request or r.request_id == request:
                r.finish_reason = r.finish_reason or "cancelled"
                self.pending.remove(r)
                r.prefill = None
                return True
        for r in self.active:
            if r is request or r.request_id == request:
                if r.finish_reason is None:
                    r.finish_reason = "cancelled"
                self._release(r)
                return True
        return False

    def reset(self) -> None:
        """Drop every active request."""
        for r in list(self.pending) + list(self.active):
            self.cancel(r)

    # ---- conveniences ----------------------------------------------------------------------------
    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
            ) -> list[Request]:
        """Run `prompts` to completion, at most max_batch_size at a time (a new one joins as soon as
        a row frees up). Returns the finished requests in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        waiting = list(zip(prompts, params))[::-1]
        done = []
        while waiting or self.active:
            while waiting and self.free_slots:
                prompt, p = waiting.pop()
                done.append(self.add_request(prompt, p))
            self.step()
        return done

    def stream_text(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> TextStream:
        """Generate a reply to `prompt` (text, or ids) and iterate over its text as it is decoded.
        The returned TextStream also has .text, .token_ids, .finish_reason and .stats at the end.
        It drives the engine itself, so the engine must have no other active request."""
        if self.tokenizer is None:
            raise SambayError("stream_text needs a tokenizer; make the Engine with tokenizer=...")
        if self.active:
            raise SambayError("stream_text drives the engine alone, but other requests are active; "
                              "use add_request/step with a TextStream per request instead")
        params = (params or SamplingParams()).validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if params.stop_token_ids is None:
            params = params.replace(stop_token_ids=text_stop_ids(self.model, self.tokenizer))
        req = self.add_request(ids, params)
        return TextStream(self, req, self.tokenizer)

    # ---- internals -------------------------------------------------------------------------------
    def _ensure_capacity(self, need: int) -> None:
        if self.state is not None and need <= self.state.max_length:
            return
        if self.active or self.pending or self.max_length is not None:
            have = self.state.max_length
            raise SambayError(f"the request needs {need} tokens (prompt + max_new_tokens) but the engine's "
                              f"state holds {have} per request; lower max_new_tokens or make the Engine "
                              f"with a larger max_length")
        # Idle and sized on demand: round up so a growing chat does not reallocate every turn.
        size = min(max(need, 256, 2 * (self.state.max_length if self.state is not None else 0)),
                   self.model.config.max_position_embeddings)
        self.state = None  # free the old one first
        self.state = self.model.new_state(self.max_batch_size, max(size, need))

    def _release(self, req: Request) -> None:
        """Take `req` out of the batch (its row goes to the prefix cache: a next chat turn starts
        with these tokens); the last active row moves into its row."""
        fed = (req.prompt_ids + req.output_ids)[:int(self.state.lengths[req.slot])]
        store_row(self.prefix_cache, self.model, self.state, req.slot, fed,
                  req.logits if len(fed) == len(req.prompt_ids) + len(req.output_ids) else None)
        i = self.active.index(req)
        last = self.active.pop()
        if last is not req:
            self.state.copy_row(last.slot, i)
            last.slot = i
            self.active[i] = last
        req.slot = -1
        req.logits = None
