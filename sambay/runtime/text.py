"""Text on top of the engine's token events: incremental decoding and stop strings.

The engine works on token ids only; these classes turn one request's events into text pieces that
never end in half a UTF-8 character, hide the stop token, and cut the text before the first stop
string (which ends the request).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the engine imports this module for Engine.stream_text
    from sambay.runtime.engine import Engine, Event, Request, Stats


class StopStrings:
    """Cuts text at the first stop string, releasing text only when no stop string can still
    start inside it: a tail that is a prefix of a stop string is held back until it is decided."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class RequestText:
    """One request's text as its token events arrive: decoded incrementally (never half a UTF-8
    character), the stop token itself not shown, and cut before the first stop string (after
    which `stopped` is true and the caller ends the request)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(stop)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, ev: Event) -> str:
        """The text this event adds (may be empty while a stop string is undecided)."""
        text = "" if ev.finish_reason == "stop" else self.decoder.push(ev.token_id)
        if ev.finished:
            text += self.decoder.flush()
        piece = self.stops.push(text)
        if ev.finished:
            piece += self.stops.flush()
        return piece


class TextStream:
    """Iterate over the text of one request as it is generated (see Engine.stream_text).

    Text is decoded incrementally (never half a UTF-8 character), the stop token itself is not
    shown, and text is cut before the first stop string, which ends the request (finish_reason
    "stop"). close() (or leaving a for loop with break/KeyboardInterrupt) cancels the request.
    """

    def __init__(self, engine: Engine, request: Request, tokenizer):
        self.engine, self.request = engine, request
        self.pieces = RequestText(tokenizer, request.params.stop)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        return self.request.output_ids

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason

    @property
    def stats(self) -> Stats:
        return self.request.stats

    def __iter__(self) -> Iterator[str]:
        try:
            while not self.request.finished:
                for ev in self.engine.step():
                    if ev.request_id != self.request.request_id:
                        continue
                    piece = self.pieces.push(ev)
                    if self.pieces.stopped:
                        self.engine.cancel(self.request)  # a no-op if it just finished anyway
                        self.request.finish_reason = "stop"
                    if piece:
                        self.text += piece
                        yield piece
        finally:
            self.close()

    def close(self) -> None:
        """Stop generating (a no-op once the request has finished)."""
        self.engine.cancel(self.request)

    def read(self) -> str:
        """Run to the end and return the whole text."""
        for _ in self:
            pass
        return self.text
