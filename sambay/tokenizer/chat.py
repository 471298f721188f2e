"""The Phi-4 chat format, and rendering chat messages (and tools) through a jinja2 chat template.

Rendering follows transformers 4.46's `apply_chat_template(..., tokenize=False)`: the same sandboxed
environment, the `{% generation %}` tag, `raise_exception`, `strftime_now` and its `tojson`, so a
checkpoint's own template gives the same text here as there.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from sambay.errors import SambayError

# Verbatim from the checkpoint's tokenizer_config.json: `<|role|>content<|end|>` per message, a
# system message carrying a `tools` string gets `<|tool|>tools<|/tool|>`, then `<|assistant|>`.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] "
    "+ '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_EOS = "<|endoftext|>"  # also bos, pad and unk in the checkpoint's tokenizer_config.json
END_OF_TURN = "<|end|>"  # what the chat template closes every message with: a stop token too


class _GenerationTag(jinja2.ext.Extension):
    # transformers lets templates mark the assistant's part with {% generation %} ...
    # {% endgeneration %} (to build training masks); for rendering it is a plain block.
    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers replaces jinja2's tojson, which would HTML-escape and sort keys.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.cache
def _jinja_environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def compile_template(source: str) -> jinja2.Template:
    """The jinja2 template of a chat template's source; SambayError if it is not valid jinja2."""
    try:
        return _jinja_environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise SambayError(f"the chat template is not valid jinja2 (line {exc.lineno}: {exc.message}); "
                          "fix chat_template in tokenizer_config.json") from exc


def check_messages(messages: Any) -> None:
    """SambayError unless `messages` is a list of {"role": str, ...} dicts, the shape every chat
    template expects (checked before the template is even compiled, so the message says what the
    caller got wrong)."""
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise SambayError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise SambayError(f"message {i} must be a dict with a string 'role', got {message!r}")


def render_chat(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Any = None,
    documents: Any = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """`messages` (checked by `check_messages`) rendered by `template`; `variables` (the
    special-token strings and the caller's extra keyword arguments) become template variables,
    except the ones that are None. A template that fails on the messages raises SambayError."""
    variables = {k: v for k, v in (variables or {}).items() if v is not None}
    try:
        return template.render(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:
        raise SambayError(f"the chat template rejected the messages: {exc}") from exc
    except TypeError as exc:  # e.g. a message without 'content' meets `'<|' + role + ...`
        raise SambayError(f"the chat template could not render the messages ({exc}); check each "
                          "message has the fields the template uses (usually 'content')") from exc
