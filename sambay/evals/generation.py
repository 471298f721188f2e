"""The one place the evals touch a model: a generate function over `sambay.engine.Engine`.

Every eval takes a `GenerateFn`: given prompts (text) and one `SamplingParams` per prompt, it yields
`(index, text)` pairs as each generation finishes, in whatever order they finish. The evals build
prompts and score texts only, so the same loop runs against a real checkpoint from the command line
and against a scripted fake in the tests. Yielding as each one finishes (rather than returning a
list) is what lets `sambay eval math` save every sample the moment it exists, and lets a batch
refill a free row at once instead of waiting for its slowest member (reasoning traces vary in
length by 10x).

The engine only knows token ids; stop strings (the phonebook stops at the first newline) are
applied here with the same `StopStrings` the engine's own text layer uses, per request, because
`TextStream` drives the engine alone and cannot share it with other requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

from sambay.runtime.engine import Engine, Event, default_stop_ids
from sambay.runtime.text import StopStrings
from sambay.runtime.sampling import SamplingParams

GenerateFn = Callable[[Sequence[str], Sequence[SamplingParams]], Iterator[tuple[int, str]]]


def first_line(text: str) -> str:
    """The text up to its first newline: what the retrieval evals score."""
    return text.split("\n", 1)[0]


class _RequestText:
    """The text of one request, decoded incrementally and cut at its first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(stop)
        self.text = ""

    def push(self, ev: Event) -> None:
        piece = "" if ev.finish_reason == "stop" else self.decoder.push(ev.token_id)  # no stop id text
        if ev.finished:
            piece += self.decoder.flush()
        piece = self.stops.push(piece)
        if ev.finished:
            piece += self.stops.flush()
        self.text += piece

    @property
    def stopped(self) -> bool:
        return self.stops.stopped


def engine_generate(model, tokenizer, batch_size: int = 1) -> GenerateFn:
    """A GenerateFn that runs up to `batch_size` prompts at a time through one Engine.

    Each call makes an Engine whose state holds the call's longest prompt + max_new_tokens (the
    engine grows its state only when idle, so it must fit every row from the start). Generation
    stops at the model's end-of-sequence ids (and the tokenizer's) unless params say otherwise.
    """
    stop_ids = default_stop_ids(model)
    stop_ids += [i for i in getattr(tokenizer, "eos_token_ids", []) if i not in stop_ids]
    context = model.config.max_position_embeddings

    def generate(prompts: Sequence[str], params: Sequence[SamplingParams]) -> Iterator[tuple[int, str]]:
        if not prompts:
            return
        ids = [tokenizer.encode(p) for p in prompts]
        params = [p if p.stop_token_ids is not None else p.replace(stop_token_ids=stop_ids) for p in params]
        need = max(len(x) + p.max_new_tokens for x, p in zip(ids, params))
        # Capped at the context: a request beyond it then fails in add_request with the clear message.
        engine = Engine(model, tokenizer, max_batch_size=min(batch_size, len(prompts)),
                        max_length=min(need, context))
        waiting = deque(range(len(prompts)))
        texts: dict[int, _RequestText] = {}
        try:
            while waiting or engine.num_active:
                while waiting and engine.free_slots:
                    i = waiting.popleft()
                    engine.add_request(ids[i], params[i], request_id=i)  # prefills row by row
                    texts[i] = _RequestText(tokenizer, params[i].stop)
                for ev in engine.step():  # one batched decode step over every active row
                    text = texts[ev.request_id]
                    text.push(ev)
                    if text.stopped and not ev.finished:
                        engine.cancel(ev.request_id)
                    if ev.finished or text.stopped:
                        yield ev.request_id, texts.pop(ev.request_id).text
        finally:
            engine.reset()  # an interrupted run leaves no half-decoded rows behind

    return generate
