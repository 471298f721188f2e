"""Incremental detokenization, and the byte <-> character table of byte-level BPE vocabularies.

A character can be split over several byte-level tokens, so text shown while a reply is generated
has to be held back until its bytes are complete; `StreamDecoder` does that. The table maps the 256
bytes to the printable characters byte-level vocabularies are written in (" the" is "Ġthe"), which
is how raw token bytes are read back (the server's logprobs) and how o200k ranks become tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Protocol


class Decodes(Protocol):
    """What StreamDecoder needs of a tokenizer (a `Tokenizer`, whose module imports this one)."""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to
    code points from 256 on, so every token is a plain string without spaces (e.g. " the" is
    "Ġthe").
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# The name the server has imported it under.
_bytes_to_unicode = bytes_to_unicode


def byte_level(token: bytes) -> str:
    """`token`'s bytes written in the byte-level alphabet, as a vocabulary entry."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


class StreamDecoder:
    """Turns ids into text one id at a time, for printing a reply while it is generated.

    A character can be split over several byte-level tokens; decoding such a token alone gives
    U+FFFD. So text is only released once it does not end in U+FFFD, and each step decodes just
    the ids since the last release (plus the previous released group as context, for decoders
    whose output depends on the neighbour, e.g. ones that drop a leading space). Concatenating
    all push() results and flush() gives decode(all ids).
    """

    # An unfinished character is at most 3 bytes, so at most 3 byte-level tokens. If many more
    # ids than that pile up and the text still ends in U+FFFD, the model really produced invalid
    # UTF-8 (or the character U+FFFD itself): release it rather than re-decode a growing window.
    MAX_PENDING = 16

    def __init__(self, tokenizer: Decodes, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._context: list[int] = []  # last released group, decoded again only as context
        self._pending: list[int] = []  # ids whose text is not released yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, text: str) -> str:
        """Return the part of `text` (= decode(context + pending)) after the context's text."""
        # For byte-level BPE `text` simply starts with the context's text; cutting by length also
        # suits decoders that only change how the first token reads (a dropped leading space).
        new = text[len(self._decode(self._context)):]
        # The released group is the next context, unless it ended in broken bytes: those must not
        # join up with the next ids, or the text would shift under what was already released.
        self._context = [] if new.endswith("\ufffd") else self._pending
        self._pending = []
        return new

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete (often "", never half a character)."""
        self._pending.append(int(token_id))
        text = self._decode(self._context + self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self.MAX_PENDING:
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Return whatever is held back (at the end of generation), U+FFFD included."""
        if not self._pending:
            return ""
        return self._release(self._decode(self._context + self._pending))

    def reset(self) -> None:
        self._context, self._pending = [], []
