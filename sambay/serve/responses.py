"""The engine's outputs as OpenAI JSON: whole responses, stream chunks (server-sent events), logprobs
and usage, for both /v1/chat/completions and /v1/completions.

The two endpoints differ only in shape (a chat choice has a `message` or a `delta`, a completion
choice has `text`; chat logprobs carry bytes, completion logprobs text offsets), so each builder
takes `chat` and gives the shape the OpenAI API reference shows for that endpoint.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sambay.serve.protocol import APIError
from sambay.serve.reasoning import REASONING, ReasoningParser
from sambay.serve.scheduler import Output, TokenLogprob
from sambay.serve.tools import ToolCallParser
from sambay.tokenizer import bytes_to_unicode


class Reply:
    """One chat choice's text as the OpenAI fields it belongs to, as it arrives: the thinking
    (reasoning_content, when parsed: sambay/serve/reasoning.py), the answer (content) and its tool
    calls (tool_calls, when the request has tools: sambay/serve/tools.py). `prefix` is the text
    the prompt made the reply start with (the opening of a required call)."""

    def __init__(self, reasoning: bool, thinking: bool = False, tools: bool = False, prefix: str = ""):
        self.reasoning = ReasoningParser(thinking) if reasoning else None
        self.tools = ToolCallParser() if tools else None
        self.fields: dict[str, str] = {}
        self.calls: list[dict] = []
        self._prefix = prefix

    def push(self, text: str, final: bool = False) -> list[dict]:
        """The deltas (each {field: value}) this text completes; final: the reply ended."""
        text, self._prefix = self._prefix + text, ""
        parts = self.reasoning.push(text) if self.reasoning else [("content", text)] if text else []
        if final and self.reasoning:
            parts += self.reasoning.flush()
        deltas: list[dict] = []
        for field, piece in parts:
            if field == REASONING or self.tools is None:
                deltas.append({field: piece})
            else:
                deltas += self._answer(self.tools.push(piece))
        if final and self.tools:
            deltas += self._answer(self.tools.flush())
        out: list[dict] = []
        for d in deltas:  # neighbours of one text field become one delta
            (key, value), = d.items()
            if key != "tool_calls" and out and key in out[-1]:
                out[-1][key] += value
            else:
                out.append(dict(d))
            if key != "tool_calls":
                self.fields[key] = self.fields.get(key, "") + value
        return out

    def _answer(self, parts: list) -> list[dict]:
        deltas = []
        for kind, value in parts:
            if kind == "tool_calls":
                self.calls += value
                deltas.append({"tool_calls": value})
            else:
                deltas.append({"content": value})
        return deltas

    def finish_reason(self, finish: str | None) -> str | None:
        return "tool_calls" if self.calls and finish == "stop" else finish

    def message(self) -> dict:
        """The whole reply as a chat message (after the final push)."""
        message = {"role": "assistant", "content": self.fields.get("content", None if self.calls else ""),
                   "refusal": None}
        if self.reasoning is not None:
            message["reasoning_content"] = self.fields.get(REASONING, "" if self.reasoning.saw_reasoning else None)
        if self.calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.calls]
        return message


class TokenText:
    """The raw bytes and text of single tokens, for logprobs (a token may be part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) or ""
            raw = bytes(self._byte_of[c] for c in piece) if all(c in self._byte_of for c in piece) \
                else piece.encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit


def chat_logprobs(lps: list[TokenLogprob], text_of: TokenText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token, raw = text_of(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, p) for i, p in lp.top]}
                        for lp in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], text_of: TokenText, offset: int) -> dict:
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        tokens.append(text_of(lp.token_id)[0])
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text_of(i)[0]: p for i, p in lp.top} for lp in lps], "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body


def output_error(out: Output) -> APIError:
    """A job that ended in an error, as the APIError its status means (400, 500 or 503)."""
    if out.status == 400:
        return APIError(400, out.error)
    return APIError(out.status, out.error, type="server_error", code="shutting_down" if out.status == 503 else None)


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def response_body(rid: str, chat: bool, model_name: str, results: list[tuple[int, Output]],
                  prompt_tokens: int, text_of: TokenText, replies: list[Reply] | None = None,
                  reasoning_tokens: int | None = None) -> dict:
    """A whole (not streamed) response: one choice per (choice index, merged Output); a chat
    choice's message is its Reply's fields (a plain message without replies)."""
    choices = []
    for k, (index, out) in enumerate(results):
        if chat:
            logprobs = chat_logprobs(out.logprobs or [], text_of) if out.logprobs is not None else None
            reply = replies[k] if replies else Reply(reasoning=False)
            reply.push(out.text, final=True)
            choices.append({"index": index, "message": reply.message(), "logprobs": logprobs,
                            "finish_reason": reply.finish_reason(out.finish_reason)})
        else:
            logprobs = completion_logprobs(out.logprobs or [], text_of, 0) if out.logprobs is not None else None
            choices.append({"index": index, "text": out.text, "logprobs": logprobs,
                            "finish_reason": out.finish_reason})
    completion_tokens = sum(out.completion_tokens for _, out in results)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": usage(prompt_tokens, completion_tokens, reasoning_tokens),
            "system_fingerprint": None}


class StreamChunks:
    """The events of one streamed response: every chunk carries the same id, object and created
    time; with include_usage each has `"usage": null` but the last, which has the totals."""

    def __init__(self, rid: str, chat: bool, model_name: str, include_usage: bool, text_of: TokenText):
        self.chat, self.include_usage, self.text_of = chat, include_usage, text_of
        self.base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model_name}
        self._offsets: dict[int, int] = {}  # completions: each choice's text so far, for text_offset

    def _chunk(self, choices: list[dict], usage_value: dict | None = None) -> str:
        return sse({**self.base, "choices": choices, **({"usage": usage_value} if self.include_usage else {})})

    def roles(self, indices: list[int]) -> str:
        """Chat only: the first chunk, which says every choice is the assistant's."""
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in indices])

    def piece(self, index: int, text: str, lps: list[TokenLogprob] | None, finish: str | None = None) -> str:
        """A choice's next text (and its tokens' logprobs), or with finish set its last chunk."""
        if self.chat:
            choice = {"index": index, "delta": {"content": text} if text or lps else {},
                      "logprobs": chat_logprobs(lps, self.text_of) if lps else None, "finish_reason": finish}
        else:
            offset = self._offsets.get(index, 0)
            choice = {"index": index, "text": text,
                      "logprobs": completion_logprobs(lps, self.text_of, offset) if lps else None,
                      "finish_reason": finish}
            self._offsets[index] = offset + len(text)
        return self._chunk([choice])

    def deltas(self, index: int, deltas: list[dict], lps: list[TokenLogprob] | None) -> str:
        """Chat: one chunk per delta of a Reply, each carrying the field its text belongs to
        (reasoning_content, content or tool_calls); the tokens' logprobs ride on the first."""
        if not deltas and not lps:
            return ""
        chunks = []
        for k, delta in enumerate(deltas or [{}]):
            logprobs = chat_logprobs(lps, self.text_of) if lps and k == 0 else None
            chunks.append(self._chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": None}]))
        return "".join(chunks)

    def usage(self, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> str:
        return self._chunk([], usage(prompt_tokens, completion_tokens, reasoning_tokens))
