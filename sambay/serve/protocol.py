"""The OpenAI API's request bodies as pydantic models, and what a request means to the engine:
its prompt ids (`chat_prompt`, `completion_prompts`) and its one SamplingParams (`sampling_params`).

Fields are in the order of the OpenAI API reference, sambay's (and vLLM's) extensions at the end.
Validation is strict, as in the OpenAI API ("0.5" is not a number, unknown fields are refused), and
every problem becomes an `APIError`: an HTTP status with OpenAI's {"error": {...}} body, naming the
field. The routes (sambay/serve/app.py) call `parse_json`, then these mappings; the engine's
outputs become OpenAI JSON in sambay/serve/responses.py.
"""

# No `from __future__ import annotations`: pydantic reads these annotations at class creation.

import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sambay.errors import SambayError
from sambay.runtime.sampling import SamplingParams
from sambay.serve.reasoning import opens_thinking
from sambay.serve.tools import reply_prefix, template_messages, tool_definitions
from sambay.serve.structured import forced_call_grammar, request_grammar

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 16
# The smallest temperature and repetition penalty the sampler divides logits by: below it the
# division overflows to inf and the draw to NaN (a smaller temperature is raised to it, as vLLM
# does, being greedy in all but name; a smaller penalty is refused).
MIN_DIVISOR = 0.01
SEED_RANGE = (-(2**63), 2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Request bodies, fields in the order of the OpenAI API reference; sambay's extras at the end
# ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not an integer, as in the OpenAI API. Unknown fields
    # are refused (OpenAI: "Unrecognized request argument supplied") so a typo is never ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as the OpenAI API sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with the history
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an earlier reply's thinking: accepted, left out of the prompt


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow pydantic's
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text, any JSON object, or JSON valid against a schema; enforced by a
    grammar over the request's tokens (sambay/serve/structured.py)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage]
    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    parallel_tool_calls: bool | None = None
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # sambay (and vLLM) extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_DIVISOR)  # divides logits: a tinier one overflows
    ignore_eos: bool = False
    reasoning_budget: int | None = Field(None, ge=-1)  # thinking tokens before </think> is forced; -1: no limit


class CompletionRequest(_Body):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # sambay (and vLLM) extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_DIVISOR)  # divides logits: a tinier one overflows
    ignore_eos: bool = False


AnyRequest = ChatCompletionRequest | CompletionRequest

# What a field that accepts several shapes wants, for errors about it.
SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "stop": "a string or a list of strings",
}


# ---------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, and pydantic's complaints translated into it
# ---------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (never FastAPI's 422)."""
    err = e.errors()[0]
    loc, union = [], False
    for part in err["loc"]:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")):
            union = True  # pydantic names the union member it tried; the field is what matters
            break
        loc.append(part)
    param = ".".join(str(p) for p in loc) or None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return APIError(400, "the request body must be a JSON object")
    if err["type"] == "missing":
        return APIError(400, f"missing required field {param!r}", param=param)
    field = str(loc[-1]) if loc else ""
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if union or field in SHAPES:
        text = f"{param} must be {SHAPES.get(field, 'one of the documented types')}"
    else:
        text = f"{param}: {err['msg'][0].lower()}{err['msg'][1:]}"
    return APIError(400, f"{text}, got {got}", param=param)


def parse_request(model: type[BaseModel], data: Any) -> Any:
    """Decoded JSON as the request body `model`; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def parse_json(raw: bytes, model: type[BaseModel]) -> Any:
    """A request body's bytes as `model`, whatever its content type (`curl -d` sends
    form-urlencoded); JSON that does not parse is a 400 saying where."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"the request body is not valid JSON ({getattr(e, 'msg', e)}{where}); "
                            f"send one JSON object") from None
    return parse_request(model, data)


# ---------------------------------------------------------------------------------------------
# Request -> prompt ids and SamplingParams
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What the handlers need to know about the loaded model (set once loading is done)."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int  # tokens per request: prompt + completion
    max_tokens: int  # the most a request may ask to generate
    stop_ids: list[int]
    defaults: dict[str, float]  # sampling defaults from generation_config.json


def sampling_params(req: AnyRequest, prompt_len: int, info: ModelInfo) -> SamplingParams:
    """The one mapping from a request body to SamplingParams. Raises APIError (400) naming the field.

    Sampling fields left out fall back to the checkpoint's generation_config.json, then to
    OpenAI's defaults (temperature 1, top_p 1). max_tokens left out means 16 for completions
    (OpenAI's default) and as much as fits for chat.
    """
    chat = isinstance(req, ChatCompletionRequest)
    field = "messages" if chat else "prompt"
    room = info.max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens, but this server's context is "
                            f"{info.max_model_len} tokens for prompt and completion together; shorten the "
                            f"{field}", param=field, code="context_length_exceeded")
    param, max_tokens = "max_tokens", req.max_tokens
    if chat and req.max_completion_tokens is not None:
        param, max_tokens = "max_completion_tokens", req.max_completion_tokens
    if max_tokens is None:
        max_tokens = min(info.max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS, info.max_tokens, room)
    elif max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    elif max_tokens > info.max_tokens:
        raise APIError(400, f"{param} is {max_tokens}, more than this server allows per request "
                            f"({info.max_tokens}); ask for fewer", param=param)
    elif max_tokens > room:
        raise APIError(400, f"this server's context is {info.max_model_len} tokens, but {prompt_len + max_tokens} "
                            f"were requested ({prompt_len} in the {field}, {max_tokens} for the completion); "
                            f"lower {param} or shorten the {field}", param=param, code="context_length_exceeded")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with \"stream\": true", param="stream_options")
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs \"logprobs\": true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        if req.echo or req.suffix is not None or (req.best_of or 1) != 1:
            name = "echo" if req.echo else "suffix" if req.suffix is not None else "best_of"
            raise APIError(400, f"{name} is not supported by this server", param=name)
        logprobs = req.logprobs
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")

    def pick(name: str, off: float) -> Any:
        value = getattr(req, name)
        return value if value is not None else info.defaults.get(name, off)

    top_k = pick("top_k", 0)
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=_temperature(pick("temperature", 1.0)), top_k=max(int(top_k), 0),
        top_p=float(pick("top_p", 1.0)), min_p=float(pick("min_p", 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=float(req.presence_penalty or 0.0), frequency_penalty=float(req.frequency_penalty or 0.0),
        seed=req.seed, stop_token_ids=[] if req.ignore_eos else list(info.stop_ids), stop=stop,
        logprobs=logprobs, grammar=_response_grammar(req, info) if chat else None)
    try:
        return params.validate()
    except SambayError as e:
        raise APIError(400, str(e)) from None


def _temperature(value: float) -> float:
    """0 stays greedy; a positive temperature below MIN_DIVISOR is raised to it."""
    return float(value) if value <= 0 else max(float(value), MIN_DIVISOR)


def _response_grammar(req: ChatCompletionRequest, info: ModelInfo) -> Any:
    """The grammar of the request's response_format (None: free text); compiled once per schema.
    A tool_choice that forces a call takes precedence: its grammar is the call's JSON."""
    try:
        forced = forced_call_grammar(info, [t.model_dump() for t in req.tools or []], _tool_choice(req),
                                     req.parallel_tool_calls is not False)
    except SambayError as e:
        raise APIError(400, str(e), param="tools") from None
    if forced is not None:
        return forced
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs \"json_schema\": {\"name\": ..., "
                            "\"schema\": {...}}", param="response_format.json_schema")
    try:
        return request_grammar(fmt, info)
    except SambayError as e:
        raise APIError(400, str(e), param="response_format") from None


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices: seeds seed, seed+1, ... (wrapping within int64), or each its own random seed."""
    if params.seed is None:
        return [params] * n
    return [params.replace(seed=(params.seed + i - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]) for i in range(n)]


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content or ""


@dataclass
class ChatPrompt:
    """A chat request's prompt: its ids (the reply's forced `prefix` included), that prefix's text
    (the reply starts with it), and whether the prompt left the thinking open."""

    ids: list[int]
    prefix: str = ""
    thinking: bool = False


def _tool_choice(req: ChatCompletionRequest) -> Any:
    """tool_choice as plain data ("auto" when tools come without one), checked against the tools."""
    choice = req.tool_choice
    names = [t.function.name for t in req.tools or []]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among "
                                f"the tools ({', '.join(names) or 'none given'})", param="tool_choice")
        return choice.model_dump()
    if choice == "required" and not names:
        raise APIError(400, "tool_choice \"required\" needs tools; send \"tools\": [...]", param="tool_choice")
    return choice or ("auto" if names else "none")


def chat_prompt(req: ChatCompletionRequest, tokenizer) -> ChatPrompt:
    """The messages (and tools) through the model's chat template, ending with the assistant's turn
    and, when tool_choice requires a call, the opening of that call (sambay/serve/tools.py)."""
    if not req.messages:
        raise APIError(400, "messages must not be empty; send at least one {\"role\": \"user\", \"content\": ...}",
                       param="messages")
    choice = _tool_choice(req)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m),
                 "tool_calls": [c.model_dump() for c in m.tool_calls or []]} for m in req.messages]
    tools = tool_definitions([t.model_dump() for t in req.tools or []], choice)
    prefix = reply_prefix(choice)
    try:
        text = tokenizer.apply_chat_template(template_messages(messages, tools), add_generation_prompt=True)
    except SambayError as e:
        raise APIError(400, str(e), param="messages") from None
    return ChatPrompt(tokenizer.encode(text + prefix), prefix, opens_thinking(text) and not prefix)


def completion_prompts(req: CompletionRequest, info: ModelInfo) -> list[list[int]]:
    """One list of ids per prompt: text is encoded, token ids are checked against the vocabulary."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [info.tokenizer.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [info.tokenizer.encode(p) for p in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "the prompt is empty; send some text or token ids", param="prompt")
    for p in prompts:
        bad = [i for i in p if not 0 <= i < info.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range; this model's ids are 0..{info.vocab_size - 1}",
                           param="prompt")
    return prompts
