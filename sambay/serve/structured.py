"""Structured output: a request's `response_format` (or a forced tool call) as a grammar whose token
mask constrains that request's row of the batch, through xgrammar.

Why xgrammar and not llguidance: both are maintained and have CPU wheels, and both were measured
the same way (scripts: a 4-field nested json_schema, its valid document fed token by token, the
mask computed before each token, one thread; the figures are in docs/benchmarks.md, "Structured
output"). xgrammar's mask was several times cheaper per token on the default model's 4,096-token
vocabulary and on Phi-4's 200,064, its tokenizer setup is cheaper (llguidance builds a token trie
for seconds on Phi-4's vocabulary), and it applies its packed bitmask to a logits row in C++
without materializing a (V,) bool tensor.

    grammars = Grammars.of(info)                                    # one per loaded model
    grammar = grammars.response_format({"type": "json_schema", ...})  # compiled, shared by n choices
    params = params.replace(grammar=grammar)                        # the engine makes its matcher

The engine asks `grammar.new_matcher()` once per request; the matcher masks that row's logits
before sampling (`mask_logits`) and follows the chosen token (`accept`). Rows without a grammar
never touch this module. The grammar allows the request's stop ids exactly when the JSON is
complete, so a constrained reply ends with "stop" as soon as its document is done.

`keep_from_bitmask` is the plain-torch meaning of xgrammar's packed mask; the tests hold
`GrammarMatcher.mask_logits` (xgrammar's C++ apply) equal to it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from sambay.errors import SambayError
from sambay.serve.tools import call_schema, forced_call_schema, strict_tools

try:  # optional: the `serve` extra installs it; without it response_format is refused clearly
    import xgrammar
except ImportError:  # pragma: no cover - depends on the environment
    xgrammar = None

# Compact JSON (no free whitespace): a weak model cannot wander off into endless blank space, and
# the reply parses the same.
SEPARATORS = (",", ":")
ANY_OBJECT = {"type": "object"}


def keep_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Reference meaning of a packed mask: (W,) int32, bit j of word i allows token 32 * i + j.
    Returns keep (vocab_size,) bool."""
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask.to(torch.int32).unsqueeze(1) >> bits) & 1).flatten()[:vocab_size].bool()


class GrammarMatcher:
    """One request's position in its grammar: masks its logits row, follows its tokens."""

    def __init__(self, compiled, vocab_size: int):
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def fill_bitmask(self) -> torch.Tensor:
        """The packed mask of the tokens allowed next, (W,) int32."""
        self._matcher.fill_next_token_bitmask(self.bitmask, 0)
        return self.bitmask[0]

    def mask_logits(self, row: torch.Tensor) -> None:
        """Set the disallowed tokens of one float32 logits row (V,) to -inf, in place."""
        self.fill_bitmask()
        xgrammar.apply_token_bitmask_inplace(row.unsqueeze(0), self.bitmask, vocab_size=self.vocab_size)

    def accept(self, token_id: int) -> bool:
        """Advance past the sampled token; False if the grammar did not allow it."""
        return self._matcher.accept_token(int(token_id))

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


class Grammar:
    """A compiled grammar: immutable, shared by every choice of a request."""

    def __init__(self, compiled, vocab_size: int, description: str):
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.description = description

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.compiled, self.vocab_size)

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


class Grammars:
    """The grammar compiler of one loaded model (tokenizer + vocabulary + stop ids), with xgrammar's
    compile cache, so a schema sent again is not compiled again."""

    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        if xgrammar is None:
            raise SambayError("structured output needs the xgrammar package; install sambay's serve extra "
                              "(pip install 'sambay[serve]')")
        # The vocabulary as the tokenizer stores it (byte-level strings); ids past the tokenizer's
        # (a model's padded embedding rows) are empty and never allowed.
        vocab = [tokenizer.id_to_token(i) or "" for i in range(vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                      stop_token_ids=list(stop_ids) or None)
        self.vocab_size = vocab_size
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    @classmethod
    def of(cls, info) -> Grammars:
        """The Grammars of a server's ModelInfo, made on first use and kept on it."""
        with cls._lock:
            grammars = getattr(info, "_grammars", None)
            if grammars is None:
                grammars = cls(info.tokenizer, info.vocab_size, info.stop_ids)
                info._grammars = grammars
            return grammars

    def json_schema(self, schema: dict, strict: bool = True, description: str = "json_schema") -> Grammar:
        """JSON valid against `schema`. strict: no properties beyond those the schema lists (OpenAI's
        strict mode); not strict: JSON Schema's own defaults (extra properties allowed)."""
        try:
            compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                         separators=SEPARATORS, strict_mode=strict)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError with the reason
            raise SambayError(f"the JSON schema could not be compiled ({str(e).splitlines()[0][:200]}); "
                              f"send a valid JSON Schema") from None
        return Grammar(compiled, self.vocab_size, description)

    def response_format(self, response_format: dict | None) -> Grammar | None:
        """OpenAI's response_format as a grammar: None for text, any JSON object for json_object,
        the schema for json_schema ({"json_schema": {"name", "schema", "strict"}})."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_schema(ANY_OBJECT, strict=False, description="json_object")
        spec = response_format.get("json_schema") or {}
        return self.json_schema(spec.get("schema") or ANY_OBJECT, strict=bool(spec.get("strict")),
                                description=f"json_schema {spec.get('name', '')}".strip())


def tool_call_grammar(info, name: str, parameters: dict | None, strict: bool = True) -> Grammar:
    """The JSON of one call of function `name`, {"name": name, "arguments": {...valid against
    parameters...}}, as Phi-4's template writes inside <|tool_call|>[...]<|/tool_call|>."""
    return Grammars.of(info).json_schema(call_schema(name, parameters), strict=strict,
                                         description=f"tool call {name}")


def forced_call_grammar(info, tools: list[dict], choice: Any, parallel: bool = True) -> Grammar | None:
    """For a tool_choice that forces a call ("required" or a named function): the call list that
    follows `<|tool_call|>` (sambay/serve/tools.py forces that tag: a special token, which the
    grammar's byte-level text does not hold), each call's arguments valid against its function's
    parameters; the reply is then parsed as any tool call. None when nothing is forced."""
    schema = forced_call_schema(tools, choice, parallel)
    if schema is None:
        return None
    name = choice["function"]["name"] if isinstance(choice, dict) else "required"
    return Grammars.of(info).json_schema(schema, strict=strict_tools(tools), description=f"tool call {name}")


def request_grammar(response_format: Any, info) -> Grammar | None:
    """The grammar a chat request's response_format asks for (None: unconstrained), for the server."""
    if response_format is None:
        return None
    data = response_format.model_dump(by_alias=True) if hasattr(response_format, "model_dump") else response_format
    if data.get("type", "text") == "text":
        return None
    return Grammars.of(info).response_format(data)
