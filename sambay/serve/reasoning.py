"""A reasoning model's reply split into its thinking and its answer, as the text arrives.

Phi-4-mini-(flash-)reasoning writes its thinking as plain text between `<think>` and `</think>`
(the tokenizer has no special token for either), so the split is made on text, never on ids, and
leniently, because a sampled reply does not always keep the format:

- text before `<think>` is answer (content), the thinking follows the tag;
- a reply cut off inside the thinking (no `</think>`) is all thinking;
- a missing opening tag: when the prompt already opened the thinking (`open_at_start`, a template
  that ends its generation prompt with `<think>`), everything up to `</think>` is thinking, and a
  `<think>` the model writes anyway is dropped;
- several closing tags: the thinking ends at the first, later stray `</think>` are dropped, and
  a later `<think>` opens a second stretch of thinking.

`ReasoningParser` is incremental and gives the same split however the text is cut into pieces
(one push of the whole reply, or one push per token): a tail that may be the start of a tag is
held back until the next piece decides it. The whitespace right after a tag is dropped, as
llama.cpp's server does, so the answer does not start with the blank line models write after
`</think>`. `split_reasoning` is the whole-text form.

`ThinkingBudget` is the per-request hook the scheduler calls on every token's text: it counts the
tokens spent thinking (usage.completion_tokens_details.reasoning_tokens) and, once a budget is
spent inside the thinking, queues the tokens of `</think>` on the engine request (its forced-token
queue), so the model is made to close its thinking and answer.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning_content", "content"  # the OpenAI field each part belongs to
CLOSE_TEXT = CLOSE + "\n\n"  # what a spent budget makes the model write


def _held_tail(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


class ReasoningParser:
    """Splits a reply into (field, text) parts, field REASONING or CONTENT, as pieces arrive."""

    def __init__(self, open_at_start: bool = False):
        self.thinking = open_at_start
        self.saw_reasoning = open_at_start
        self._pending = ""
        self._strip = open_at_start  # drop whitespace right after a tag (or an opened prompt)

    def push(self, text: str) -> list[tuple[str, str]]:
        """The parts `text` completes; a possible tag at its end waits for the next push."""
        self._pending += text
        parts: list[tuple[str, str]] = []
        while True:
            hits = [(i, t) for t in (OPEN, CLOSE) if (i := self._pending.find(t)) >= 0]
            if not hits:
                break
            i, tag = min(hits)
            self._emit(parts, self._pending[:i])
            self._pending = self._pending[i + len(tag):]
            if (tag == OPEN) != self.thinking:  # an opening tag in the answer, or a closing one in thinking
                self.thinking = tag == OPEN
                self.saw_reasoning = True
                self._strip = True
            # else: a repeated <think> inside the thinking, or a stray </think> in the answer: dropped
        hold = _held_tail(self._pending, (OPEN, CLOSE))
        self._emit(parts, self._pending[:len(self._pending) - hold])
        self._pending = self._pending[len(self._pending) - hold:]
        return parts

    def flush(self) -> list[tuple[str, str]]:
        """The reply ended: what was held back is plain text of the current field."""
        parts: list[tuple[str, str]] = []
        self._emit(parts, self._pending)
        self._pending = ""
        return parts

    def _emit(self, parts: list[tuple[str, str]], text: str) -> None:
        if self._strip:
            stripped = text.lstrip()
            if stripped:
                self._strip = False
            text = stripped
        if text:
            field = REASONING if self.thinking else CONTENT
            if parts and parts[-1][0] == field:
                parts[-1] = (field, parts[-1][1] + text)
            else:
                parts.append((field, text))


def split_reasoning(text: str, open_at_start: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when the reply has no thinking, content) of a whole reply."""
    parser = ReasoningParser(open_at_start)
    parts = parser.push(text) + parser.flush()
    reasoning = "".join(t for f, t in parts if f == REASONING)
    content = "".join(t for f, t in parts if f == CONTENT)
    return (reasoning if parser.saw_reasoning else None), content


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves the thinking open (its generation prompt ends with <think>)."""
    return prompt_text.rstrip().endswith(OPEN)


class ThinkingBudget:
    """The scheduler's per-token hook for one request: counts thinking tokens and, with a budget,
    forces `</think>` once `budget` tokens were spent thinking (0: close it as soon as it opens).

    close_ids: the tokens of CLOSE_TEXT. A token whose text closes the thinking counts as thinking.
    """

    def __init__(self, close_ids: list[int], budget: int | None = None, open_at_start: bool = False):
        self.parser = ReasoningParser(open_at_start)
        self.close_ids, self.budget = list(close_ids), budget
        self.reasoning_tokens = 0
        self.forced = False

    def __call__(self, request, text: str) -> None:
        was = self.parser.thinking
        self.parser.push(text)
        if was or self.parser.thinking:
            self.reasoning_tokens += 1
        if (self.budget is not None and not self.forced and self.parser.thinking
                and self.reasoning_tokens >= self.budget):
            self.forced = True
            request.forced.extend(self.close_ids)
