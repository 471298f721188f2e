"""Tool calls in the Phi-4 format: `tools` rendered into the prompt, `<|tool_call|>` replies parsed.

The checkpoint's chat template carries the tools as a JSON string under the system message's
`tools` key (rendered `<|system|>...<|tool|>[...]<|/tool|><|end|>`), a list of {"name",
"description", "parameters"} as in Microsoft's Phi-4-mini function-calling examples. The model
answers a call with `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`; a tool's
result goes back as a `tool` message, rendered as the `<|tool_response|>` turn (the vocabulary's
token for it), and an assistant message's own `tool_calls` are written back in the call format.

tool_choice: "none" leaves the tools out of the prompt; "auto" (the default with tools) lets the
model choose; "required" and a named function start the reply with `<|tool_call|>` (`prefix`,
written into the prompt so the model continues from there) and constrain the rest with the JSON
schema of the calls it may make (`forced_call_schema`: the function's name and arguments valid
against its `parameters`), which sambay/serve/structured.py turns into the request's grammar;
the grammar lets the reply end as soon as the call list is complete. `ToolCallParser` holds the text from `<|tool_call|>` back until the call is complete
and turns it into OpenAI tool_calls; a call that is not valid JSON of that shape goes out as the
text it was, never as an error.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
DEFAULT_TOOL_SYSTEM = "You are a helpful assistant with some tools."


def tool_definitions(tools: list[dict], choice: Any) -> str | None:
    """The JSON the template puts between <|tool|> and <|/tool|>; None when no tool is offered."""
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    defs = []
    for tool in tools:
        fn = tool["function"]
        defs.append({"name": fn["name"], "description": fn.get("description") or "",
                     "parameters": fn.get("parameters") or {"type": "object", "properties": {}}})
    return json.dumps(defs, ensure_ascii=False)


def forces_call(choice: Any) -> bool:
    """Whether the tool_choice makes the reply a call ("required" or a named function)."""
    return choice == "required" or isinstance(choice, dict)


def reply_prefix(choice: Any) -> str:
    """The text the reply is made to start with: the opening of a call the tool_choice requires
    (its JSON is left to the model under the grammar of `forced_call_schema`)."""
    return CALL_OPEN if forces_call(choice) else ""


def call_schema(name: str, parameters: dict | None) -> dict:
    """JSON Schema of one call of function `name` as the template writes it: {"name": name,
    "arguments": {...valid against parameters...}}."""
    return {"type": "object", "properties": {"name": {"const": name},
                                             "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_call_schema(tools: list[dict], choice: Any, parallel: bool = True) -> dict | None:
    """JSON Schema of what follows `<|tool_call|>` when the tool_choice forces a call: a list of
    one call of the named function, or of one or more (one if not `parallel`) calls of any
    offered function; None when the choice forces nothing."""
    if not tools or not forces_call(choice):
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    calls = [call_schema(t["function"]["name"], t["function"].get("parameters")) for t in tools]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if isinstance(choice, dict) or not parallel:
        schema["maxItems"] = 1
    return schema


def strict_tools(tools: list[dict]) -> bool:
    """OpenAI's function `strict`: arguments with no properties beyond those the parameters list.
    A forced call is strict unless a function says "strict": false."""
    return all(t["function"].get("strict") is not False for t in tools)


def _call_text(calls: list[dict]) -> str:
    items = []
    for call in calls:
        fn = call["function"]
        try:
            arguments = json.loads(fn["arguments"])
        except (TypeError, json.JSONDecodeError):
            arguments = fn["arguments"]
        items.append({"name": fn["name"], "arguments": arguments})
    return CALL_OPEN + json.dumps(items, ensure_ascii=False) + CALL_CLOSE


def template_messages(messages: list[dict], tools: str | None) -> list[dict]:
    """OpenAI messages (plain dicts, content already text) as the Phi-4 template's messages: the
    tools under the (first) system message, tool results as `tool_response` turns, an assistant's
    tool_calls written back in the call format."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content += _call_text(m["tool_calls"])
        out.append({"role": "tool_response" if role == "tool" else role, "content": content})
    if tools is not None:
        if not out or out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": DEFAULT_TOOL_SYSTEM})
        out[0]["tools"] = tools
    return out


def parse_calls(text: str) -> list[dict] | None:
    """The OpenAI tool_calls of one `<|tool_call|>` body, or None if it is not a call: a JSON
    list (or one object) of {"name", "arguments"} (also {"function": {...}} and "parameters")."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls or None


def _held_tail(text: str, tag: str) -> int:
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """The answer's text as ("content", text) and ("tool_calls", [call, ...]) parts, as it arrives.
    Text from `<|tool_call|>` is held until `<|/tool_call|>` (or the end of the reply: the closing
    tag is optional) and becomes calls, or the text it was if it does not parse."""

    def __init__(self):
        self._pending = ""
        self._in_call = False
        self.calls: list[dict] = []

    def push(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        parts: list[tuple[str, Any]] = []
        while True:
            if self._in_call:
                i = self._pending.find(CALL_CLOSE)
                if i < 0:
                    return parts
                self._finish_call(parts, self._pending[:i], CALL_CLOSE)
                self._pending = self._pending[i + len(CALL_CLOSE):]
                continue
            i = self._pending.find(CALL_OPEN)
            if i < 0:
                break
            self._content(parts, self._pending[:i])
            self._pending, self._in_call = self._pending[i + len(CALL_OPEN):], True
        hold = _held_tail(self._pending, CALL_OPEN)
        self._content(parts, self._pending[:len(self._pending) - hold])
        self._pending = self._pending[len(self._pending) - hold:]
        return parts

    def flush(self) -> list[tuple[str, Any]]:
        parts: list[tuple[str, Any]] = []
        if self._in_call:
            self._finish_call(parts, self._pending, "")
        else:
            self._content(parts, self._pending)
        self._pending = ""
        return parts

    def _finish_call(self, parts: list, body: str, closing: str) -> None:
        self._in_call = False
        calls = parse_calls(body)
        if calls is None:
            self._content(parts, CALL_OPEN + body + closing)
            return
        for k, call in enumerate(calls):
            call["index"] = len(self.calls) + k
        self.calls.extend(calls)
        parts.append(("tool_calls", calls))

    @staticmethod
    def _content(parts: list, text: str) -> None:
        if text:
            if parts and parts[-1][0] == "content":
                parts[-1] = ("content", parts[-1][1] + text)
            else:
                parts.append(("content", text))
