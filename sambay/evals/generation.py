"""The one place the evals touch a model: a generate function over `sambay.runtime.engine.Engine`.

Every eval takes a `GenerateFn`: given prompts (text) and one `SamplingParams` per prompt, it yields
`(index, text)` pairs as each generation finishes, in whatever order they finish. The evals build
prompts and score texts only, so the same loop runs against a real checkpoint from the command line
and against a scripted fake in the tests. Yielding as each one finishes (rather than returning a
list) is what lets `sambay eval math` save every sample the moment it exists, and lets a batch
refill a free row at once instead of waiting for its slowest member (reasoning traces vary in
length by 10x).

The engine only knows token ids; stop strings (the phonebook stops at the first newline) are
applied here with the runtime's `RequestText`, one per request, because `TextStream` drives the
engine alone and cannot share it with other requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

from sambay.runtime.engine import Engine, text_stop_ids
from sambay.runtime.sampling import SamplingParams
from sambay.runtime.text import RequestText

GenerateFn = Callable[[Sequence[str], Sequence[SamplingParams]], Iterator[tuple[int, str]]]


def first_line(text: str) -> str:
    """The text up to its first newline: what the retrieval evals score."""
    return text.split("\n", 1)[0]


def engine_generate(model, tokenizer, batch_size: int = 1) -> GenerateFn:
    """A GenerateFn that runs up to `batch_size` prompts at a time through one Engine.

    Each call makes an Engine whose state holds the call's longest prompt + max_new_tokens (the
    engine grows its state only when idle, so it must fit every row from the start). Generation
    stops at the model's end-of-sequence ids (and the tokenizer's) unless params say otherwise.
    """
    stop_ids = text_stop_ids(model, tokenizer)
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
        pieces: dict[int, RequestText] = {}  # per active request: its decoder and stop strings
        texts: dict[int, str] = {}
        try:
            while waiting or engine.num_active:
                while waiting and engine.free_slots:
                    i = waiting.popleft()
                    engine.add_request(ids[i], params[i], request_id=i)  # prefills row by row
                    pieces[i], texts[i] = RequestText(tokenizer, params[i].stop), ""
                for ev in engine.step():  # one batched decode step over every active row
                    i, request = ev.request_id, pieces[ev.request_id]
                    texts[i] += request.push(ev)
                    if request.stopped and not ev.finished:
                        engine.cancel(i)
                    if ev.finished or request.stopped:
                        del pieces[i]
                        yield i, texts.pop(i)
        finally:
            engine.reset()  # an interrupted run leaves no half-decoded rows behind

    return generate
