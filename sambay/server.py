"""`sambay serve`: an OpenAI-compatible HTTP server over the engine, with continuous batching.

    sambay serve --model path/to/Phi-4-mini-flash-reasoning --quantize int8
    curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "Phi-4-mini-flash-reasoning",
                                                "messages": [{"role": "user", "content": "Hi"}]}'
    python -m sambay.server --bench-clients 1,32 --model DIR --threads 2   # aggregate tokens/s

Endpoints: GET /health (503 until the model is loaded, then 200), GET /metrics (Prometheus text),
GET /v1/models, POST /v1/completions and POST /v1/chat/completions ("stream": true gives
server-sent events ending in `data: [DONE]`). Every flag has an environment twin (SAMBAY_PORT, ...).

The server starts listening at once and loads the model on the scheduler thread (sambay/scheduler.py),
which then owns the Engine and batches every request's decode steps. Route handlers stay thin: a
request body becomes prompt ids and one SamplingParams (`sampling_params`), then one Job per choice;
the Jobs' Outputs become OpenAI JSON here. Every error has OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, and never disturbs other requests.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real annotations
# (Request), which are imported inside create_app so `sambay --help` never imports fastapi.

import argparse
import asyncio
import dataclasses
import hmac
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

try:
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError:  # no `serve` extra: the module must still import for `sambay --help`; run_serve
    BaseModel, ValidationError = object, Exception  # then says what to install

    def ConfigDict(**kw):  # noqa: N802 - stand-ins with pydantic's names
        return kw

    def Field(default=None, **kw):  # noqa: N802
        return default

from .errors import SambayError
from .sampling import SamplingParams
from .scheduler import Job, Metrics, NotAccepting, Output, QueueFull, Scheduler, TokenLogprob, outputs_of

DEFAULT_MAX_MODEL_LEN = 8192  # tokens per batch row (prompt + completion) unless --max-model-len
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 16
SEED_RANGE = (-(2**63), 2**63 - 1)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


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


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


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
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # sambay (and vLLM) extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False


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
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False


AnyRequest = ChatCompletionRequest | CompletionRequest

# What a field that accepts several shapes wants, for errors about it.
SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "stop": "a string or a list of strings",
}


# ---------------------------------------------------------------------------------------------
# Errors
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

    def response(self):
        from fastapi.responses import JSONResponse

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


async def parse_body(request, model: type[BaseModel]) -> Any:
    """The request's JSON as `model` (any content type: `curl -d` sends form-urlencoded)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"the request body is not valid JSON ({getattr(e, 'msg', e)}{where}); "
                            f"send one JSON object") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


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
        max_new_tokens=max_tokens, temperature=float(pick("temperature", 1.0)), top_k=max(int(top_k), 0),
        top_p=float(pick("top_p", 1.0)), min_p=float(pick("min_p", 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=float(req.presence_penalty or 0.0), frequency_penalty=float(req.frequency_penalty or 0.0),
        seed=req.seed, stop_token_ids=[] if req.ignore_eos else list(info.stop_ids), stop=stop,
        logprobs=logprobs)
    try:
        return params.validate()
    except SambayError as e:
        raise APIError(400, str(e)) from None


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices: seeds seed, seed+1, ... (wrapping within int64), or each its own random seed."""
    if params.seed is None:
        return [params] * n
    return [params.replace(seed=(params.seed + i - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]) for i in range(n)]


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content or ""


def chat_prompt(req: ChatCompletionRequest, tokenizer) -> list[int]:
    if not req.messages:
        raise APIError(400, "messages must not be empty; send at least one {\"role\": \"user\", \"content\": ...}",
                       param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                for m in req.messages]
    try:
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except SambayError as e:
        raise APIError(400, str(e), param="messages") from None


def completion_prompts(req: CompletionRequest, info: ModelInfo) -> list[list[int]]:
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


# ---------------------------------------------------------------------------------------------
# Outputs -> OpenAI JSON
# ---------------------------------------------------------------------------------------------


class TokenText:
    """The raw bytes and text of single tokens, for logprobs (a token may be part of a character)."""

    def __init__(self, tokenizer):
        from .tokenizer import _bytes_to_unicode

        self.tokenizer = tokenizer
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _output_error(out: Output) -> APIError:
    if out.status == 400:
        return APIError(400, out.error)
    return APIError(out.status, out.error, type="server_error", code="shutting_down" if out.status == 503 else None)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything `sambay serve` is told (see `add_arguments` for each one's meaning)."""

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    random_weights: bool = False
    max_batch_size: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    max_tokens: int = 4096
    max_request_bytes: int = 1 << 20
    shutdown_timeout: float = 10.0
    access_log: bool = True
    load_delay: float = 0.0  # testing: seconds to wait before loading

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def check(self) -> None:
        for name in ("max_batch_size", "max_tokens", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise SambayError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise SambayError(f"--max-queue must be 0 or more, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SambayError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise SambayError(f"--port must be in 0..65535, got {self.port}")
        # Values from the environment skip argparse's `choices` check.
        for name, allowed in (("dtype", ("float32", "bfloat16")), ("quantize", ("int8",))):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise SambayError(f"--{name} must be one of {', '.join(allowed)}, got {value!r} "
                                  f"(check SAMBAY_{name.upper()})")


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model is None:
        return "default_model"
    text = str(settings.model).rstrip("/")
    if Path(os.path.expanduser(text)).is_dir():
        return Path(os.path.expanduser(text)).resolve().name
    return text  # a Hugging Face repo id or a preset name


class ServerState:
    """The server's one mutable object: settings, metrics, the scheduler and (once loaded) the model."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_name = served_name(settings)
        self.created = int(time.time())
        self.metrics = Metrics()
        self.info: ModelInfo | None = None
        self.text_of: TokenText | None = None
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"http://{host}:{settings.port}"
        self.on_load_error = None  # set by run_serve: stops the server
        self.scheduler = Scheduler(self._load, settings.max_queue, self.metrics, self._load_failed)

    def _load(self):
        """Runs on the scheduler thread: load, size the engine, warm it up."""
        from .engine import Engine
        from .generate_cli import load

        s = self.settings
        if s.load_delay:
            time.sleep(s.load_delay)
        model, tokenizer = load(argparse.Namespace(model=s.model, dtype=s.dtype, quantize=s.quantize,
                                                   random_weights=s.random_weights))
        context = model.config.max_position_embeddings
        if s.max_model_len is not None and s.max_model_len > context:
            raise SambayError(f"--max-model-len {s.max_model_len} is beyond the model's context of {context} "
                              f"tokens; lower it")
        max_len = s.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
        engine = Engine(model, tokenizer, max_batch_size=s.max_batch_size, max_length=max_len)
        gen = dict(model.generation_config or {})
        names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        defaults = {"temperature": 0.0} if gen.get("do_sample") is False else \
            {k: gen[k] for k in names if isinstance(gen.get(k), (int, float))}
        stop_ids = list(dict.fromkeys(engine.stop_ids + list(tokenizer.eos_token_ids)))
        engine.run([[stop_ids[0] if stop_ids else 0]], SamplingParams(max_new_tokens=2))  # builds kernels
        self.text_of = TokenText(tokenizer)
        self.info = ModelInfo(tokenizer, model.config.vocab_size, max_len, min(s.max_tokens, max_len - 1),
                              stop_ids, defaults)
        state_mb = engine.state.nbytes() / 2**20
        print(f"sambay: ready: {self.model_name} on {self.url}/v1 (batch {s.max_batch_size}, "
              f"{max_len} tokens per request, decode state {state_mb:.0f} MiB)", file=sys.stderr, flush=True)
        return engine

    def begin_shutdown(self) -> None:
        """SIGINT/SIGTERM: in-flight requests get --shutdown-timeout seconds, then are ended."""
        print(f"sambay: shutting down; running requests get {self.settings.shutdown_timeout:g} s to finish",
              file=sys.stderr, flush=True)
        timer = threading.Timer(self.settings.shutdown_timeout, self.scheduler.stop)
        timer.daemon = True
        timer.start()

    def _load_failed(self, message: str) -> None:
        print(f"sambay: error: {message}", file=sys.stderr, flush=True)
        if self.on_load_error:
            self.on_load_error()

    # ---- used by the handlers --------------------------------------------------------------------
    def ready_info(self) -> ModelInfo:
        if not self.scheduler.ready.is_set():
            raise APIError(503, "the model is still loading; retry when GET /health returns 200",
                           type="server_error", code="model_loading")
        return self.info

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r} "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.scheduler.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error") from None


def _jobs(prompts: list[list[int]], params: SamplingParams, n: int) -> list[Job]:
    queue: asyncio.Queue = asyncio.Queue()
    return [Job(prompt, p, index=k * n + i, queue=queue)
            for k, prompt in enumerate(prompts) for i, p in enumerate(choice_params(params, n))]


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(state: ServerState, jobs: list[Job], request) -> list[Output] | None:
    """Run the jobs to the end and merge each one's Outputs; None if the client went away first."""
    results = {job: Output() for job in jobs}

    async def consume():
        async for job, out in outputs_of(jobs):
            results[job] = results[job].merge(out)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():
            return None
        consumer.result()
        return [results[job] for job in jobs]
    finally:
        consumer.cancel()
        watcher.cancel()
        for job in jobs:
            state.scheduler.cancel(job)


async def stream(state: ServerState, jobs: list[Job], req: AnyRequest, rid: str,
                 prompt_tokens: int, record: dict) -> AsyncIterator[str]:
    """Server-sent events: one chunk per increment, a chunk with finish_reason per choice, an
    optional usage chunk, then [DONE]. Leaving early (the client went away) cancels the jobs."""
    chat = isinstance(req, ChatCompletionRequest)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_name}
    tokens = {job: 0 for job in jobs}
    offsets = {job: 0 for job in jobs}

    def chunk(choices: list[dict], usage_value: dict | None = None) -> str:
        return _sse({**base, "choices": choices, **({"usage": usage_value} if include_usage else {})})

    def choice(job: Job, text: str, lps, finish: str | None) -> dict:
        if chat:
            return {"index": job.index, "delta": {"content": text} if text or lps else {},
                    "logprobs": chat_logprobs(lps, state.text_of) if lps else None, "finish_reason": finish}
        logprobs = completion_logprobs(lps, state.text_of, offsets[job]) if lps else None
        offsets[job] += len(text)
        return {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    try:
        if chat:
            yield chunk([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for j in jobs])
        async for job, out in outputs_of(jobs):
            tokens[job] = out.completion_tokens or tokens[job]
            if out.error:
                yield _sse(_output_error(out).body())
                break
            if out.text or out.logprobs:
                yield chunk([choice(job, out.text, out.logprobs, None)])
            if out.finish_reason:
                yield chunk([choice(job, "", None, out.finish_reason)])
        else:
            if include_usage:
                yield chunk([], usage(prompt_tokens, sum(tokens.values())))
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:  # the client went away (or shutdown ran out of time)
        record["disconnected"] = True
        raise
    finally:
        for job in jobs:
            state.scheduler.cancel(job)
        record["completion_tokens"] = sum(tokens.values())


async def run_request(state: ServerState, request, req: AnyRequest, prompts: list[list[int]]):
    """Submit one request's jobs and answer with JSON or a stream."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    info = state.info
    chat = isinstance(req, ChatCompletionRequest)
    params = sampling_params(req, max(len(p) for p in prompts), info)
    n_jobs = len(prompts) * req.n
    if n_jobs > state.settings.max_batch_size + state.settings.max_queue:
        raise APIError(400, f"{n_jobs} choices (prompts x n) are more than this server can hold at once "
                            f"({state.settings.max_batch_size + state.settings.max_queue}); send fewer", param="n")
    jobs = _jobs(prompts, params, req.n)
    state.submit(jobs)
    prompt_tokens = sum(len(p) for p in prompts)
    record = request.scope.setdefault("sambay", {})
    record["prompt_tokens"] = prompt_tokens
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if req.stream:
        return StreamingResponse(stream(state, jobs, req, rid, prompt_tokens, record),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await collect(state, jobs, request)
    if results is None:
        record["disconnected"] = True
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    for out in results:
        if out.error:
            raise _output_error(out)
    completion_tokens = sum(out.completion_tokens for out in results)
    record["completion_tokens"] = completion_tokens
    choices = []
    for job, out in zip(jobs, results):
        if chat:
            logprobs = chat_logprobs(out.logprobs or [], state.text_of) if out.logprobs is not None else None
            choices.append({"index": job.index, "message": {"role": "assistant", "content": out.text, "refusal": None},
                            "logprobs": logprobs, "finish_reason": out.finish_reason})
        else:
            logprobs = completion_logprobs(out.logprobs or [], state.text_of, 0) if out.logprobs is not None else None
            choices.append({"index": job.index, "text": out.text, "logprobs": logprobs,
                            "finish_reason": out.finish_reason})
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": state.model_name, "choices": choices,
                         "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None})


def create_app(settings: Settings, state: ServerState | None = None):
    """The FastAPI app, wrapped in the Gate (API key, body size, access log, request metrics)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    state = state or ServerState(settings)

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        await run_in_threadpool(state.scheduler.stop)

    app = FastAPI(title="sambay", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.sambay = state

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return APIError(400, f"invalid request: {e.errors()[0].get('msg', 'bad value')}").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, code=code, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return APIError(500, f"internal error ({type(e).__name__}); see the server log", type="server_error").response()

    @app.get("/health")
    async def health():
        if state.scheduler.ready.is_set():
            return {"status": "ok", "model": state.model_name}
        status = "error" if state.scheduler.load_error else "loading"
        return JSONResponse({"status": status, "model": state.model_name}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        text = state.metrics.render(state.scheduler.queue_depth, state.scheduler.running,
                                    state.scheduler.ready.is_set())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "sambay"}
        if state.info is not None:
            card["max_model_len"] = state.info.max_model_len
        return card

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        state.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse_body(request, ChatCompletionRequest)
        state.check_model(req.model)
        info = state.ready_info()
        prompt = await run_in_threadpool(chat_prompt, req, info.tokenizer)
        return await run_request(state, request, req, [prompt])

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        state.check_model(req.model)
        info = state.ready_info()
        prompts = await run_in_threadpool(completion_prompts, req, info)
        return await run_request(state, request, req, prompts)

    return Gate(app, state)


class Gate:
    """ASGI middleware in front of everything: the API key (401) and body size (413) are checked
    before the body is parsed; every request is counted in /metrics and logged as one JSON line."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        record = scope.setdefault("sambay", {})
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
                if body is None and error is None:  # the client left while sending
                    status = 499
                    return
            if error is not None:
                await error.response()(scope, receive, send_and_watch)
            else:
                await self.app(scope, _replay(body, receive), send_and_watch)
        finally:
            self._record(scope, status, time.perf_counter() - start, record)

    def _refuse(self, scope) -> APIError | None:
        key = self.state.settings.api_key
        if not key or not scope["path"].startswith("/v1/"):
            return None
        sent = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(sent, b"Bearer " + key.encode()):
            return None
        return APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>' "
                             "with the server's --api-key", type="authentication_error", code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[bytes | None, APIError | None]:
        limit = self.state.settings.max_request_bytes
        too_large = APIError(413, f"the request body is larger than this server accepts ({limit} bytes); "
                                  f"send less, or start the server with a larger --max-request-bytes",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", too_large
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _record(self, scope, status: int, seconds: float, record: dict) -> None:
        path = scope["path"]
        endpoint = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
        self.state.metrics.count_request(endpoint, status)
        if not self.state.settings.access_log:
            return
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": scope["method"], "path": path,
                "status": status, "latency_ms": round(seconds * 1000, 1),
                "prompt_tokens": record.get("prompt_tokens"), "completion_tokens": record.get("completion_tokens")}
        if record.get("disconnected"):
            line["client_disconnected"] = True
        client = scope.get("client")
        if client:
            line["client"] = client[0]
        print(json.dumps(line), file=sys.stderr, flush=True)


def _replay(body: bytes, receive):
    """A receive() that gives the already-read body once, then the real messages (disconnect)."""
    done = False

    async def replayed():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve flags; each takes its default from the environment variable named in its help."""
    def flag(name: str, env: str, help: str, default: Any = None, **kw) -> None:
        shown = "" if default is None else f", default {default}"
        p.add_argument(name, default=os.environ.get(env, default), help=f"{help} [env {env}{shown}]", **kw)

    flag("--model", "SAMBAY_MODEL", "model folder, Hugging Face repo id, or preset with --random-weights "
         "(default: the embedded model)", metavar="PATH|REPO|PRESET")
    flag("--served-model-name", "SAMBAY_SERVED_MODEL_NAME",
         "the name clients send as \"model\" (default: the model folder's name)", metavar="NAME")
    flag("--host", "SAMBAY_HOST", "address to listen on; anything but loopback exposes the server",
         "127.0.0.1")
    flag("--port", "SAMBAY_PORT", "port to listen on (0: any free port, printed at start)", 8000, type=int)
    flag("--api-key", "SAMBAY_API_KEY", "require 'Authorization: Bearer KEY' on /v1/* (default: no key)",
         metavar="KEY")
    flag("--dtype", "SAMBAY_DTYPE", "weight dtype (default: the checkpoint's)", choices=["float32", "bfloat16"])
    flag("--quantize", "SAMBAY_QUANTIZE", "quantize the weights after loading", choices=["int8"])
    p.add_argument("--random-weights", action="store_true", default=_env_flag("SAMBAY_RANDOM_WEIGHTS"),
                   help="random weights of the model's shape (for a preset) [env SAMBAY_RANDOM_WEIGHTS=1]")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="CPU threads for PyTorch (same as `sambay --threads N serve`) [env SAMBAY_THREADS]")
    flag("--max-batch-size", "SAMBAY_MAX_BATCH_SIZE", "requests decoded together (rows of the batch)", 8,
         type=int, metavar="N")
    flag("--max-queue", "SAMBAY_MAX_QUEUE", "requests that may wait for a row; more get 429", 64,
         type=int, metavar="N")
    flag("--max-model-len", "SAMBAY_MAX_MODEL_LEN", f"tokens per request, prompt + completion (default: the "
         f"model's context, at most {DEFAULT_MAX_MODEL_LEN}); sizes the decode state", type=int, metavar="N")
    flag("--max-tokens", "SAMBAY_MAX_TOKENS", "the most tokens one request may ask to generate", 4096,
         type=int, metavar="N")
    flag("--max-request-bytes", "SAMBAY_MAX_REQUEST_BYTES", "largest request body accepted; more get 413",
         1 << 20, type=int, metavar="N")
    flag("--shutdown-timeout", "SAMBAY_SHUTDOWN_TIMEOUT", "seconds in-flight requests get to finish on "
         "SIGINT/SIGTERM before they are cancelled", 10.0, type=float, metavar="S")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   default=not _env_flag("SAMBAY_NO_ACCESS_LOG"),
                   help="do not print a JSON line per request on stderr [env SAMBAY_NO_ACCESS_LOG=1]")
    p.add_argument("--load-delay", type=float, default=float(os.environ.get("SAMBAY_LOAD_DELAY", 0)),
                   help=argparse.SUPPRESS)  # testing: wait this long before loading


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                    "/v1/completions, /v1/models; /health, /metrics) with continuous batching. Listens at "
                    "once and loads the model in the background: /health says 503 until it is ready. "
                    "SIGINT/SIGTERM stop accepting, let running requests finish (--shutdown-timeout), "
                    "and exit 0.")
    add_arguments(p)
    p.set_defaults(func=run_serve)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise SambayError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server using the "
                          f"port? pick another with --port") from None
    sock.setblocking(False)
    return sock


def _check_model(settings: Settings) -> None:
    """Fail at once, in one line, on a model that cannot be there (the load itself runs later)."""
    from .checkpoint import resolve_model

    text = None if settings.model is None else str(settings.model)
    hub_repo = text is not None and text.count("/") == 1 and not text.startswith((".", "/", "~")) \
        and not Path(os.path.expanduser(text)).exists()
    if not hub_repo:  # a download can take long: that one is left to the background load
        resolve_model(settings.model)


def run_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    settings.check()
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SambayError(f"sambay serve needs fastapi and uvicorn ({e.name} is missing): "
                          f"pip install 'sambay[serve]'") from None
    _check_model(settings)
    sock = _listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    settings.port = port
    state = ServerState(settings)
    app = create_app(settings, state)
    # uvicorn's own deadline is a backstop: at --shutdown-timeout the scheduler ends what is still
    # running (streams get an error event and [DONE]), so connections close by themselves.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5, timeout_keep_alive=30)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                state.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(config)

    def stop(*_):
        server.should_exit = True

    state.on_load_error = stop
    # uvicorn catches SIGINT/SIGTERM itself while running and shuts down gracefully; afterwards it
    # re-raises the signal to the handler it found, which is this one: so a stopped server exits 0.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"sambay: listening on {state.url} ({state.model_name}; loading the model, GET /health is 503 "
          f"until it is ready)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if state.scheduler.load_error:
        return 2
    print("sambay: stopped", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Benchmark: aggregate generation speed with N concurrent clients
# ---------------------------------------------------------------------------------------------


def spawn(serve_args: Sequence[str], log_path: str | os.PathLike, timeout: float = 120.0,
          env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `sambay serve --port 0 SERVE_ARGS` as a child process, its stderr going to log_path;
    return the process and its base URL once it listens (the model may still be loading)."""
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "sambay.cli", "serve", "--port", "0", *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(log_path).read_text(errors="replace").splitlines():
            if line.startswith("sambay: listening on "):
                return proc, line.split()[3]
        if proc.poll() is not None:
            raise SambayError(f"the server exited with status {proc.returncode}: "
                              f"{Path(log_path).read_text(errors='replace').strip()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise SambayError(f"the server did not start listening within {timeout:.0f} s")


def wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll GET /health until it says 200."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SambayError(f"the server exited with status {proc.returncode} while loading")
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SambayError(f"{url}/health did not say 200 within {timeout:.0f} s")


def stream_completion(url: str, body: dict, api_key: str | None = None, timeout: float = 300.0) -> dict:
    """POST a streaming /v1/completions with the standard library; returns the text, the
    completion tokens (from the usage chunk), time to first text and total seconds."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    start = time.perf_counter()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SambayError(f"the server answered {resp.status}: {resp.read()[:500]!r}")
    text, tokens, first = [], 0, None
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
        for c in obj.get("choices", []):
            if c.get("text") and first is None:
                first = time.perf_counter() - start
            text.append(c.get("text", ""))
    conn.close()
    return {"text": "".join(text), "completion_tokens": tokens, "ttft": first,
            "seconds": time.perf_counter() - start}


def bench_clients(url: str, model: str, clients: Sequence[int] = (1, 32), max_tokens: int = 64,
                  api_key: str | None = None, prompt: str = "The quick brown fox") -> list[dict]:
    """For each count c in `clients`: c concurrent streaming clients each ask for `max_tokens`
    greedy tokens (ignore_eos, so every one generates all of them). Returns one row per count with
    the aggregate generated tokens/s (all clients' tokens over the wall time)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    stream_completion(url, {**body, "max_tokens": 2}, api_key)  # warm-up
    rows = []
    for c in clients:
        results: list[dict | Exception] = [None] * c

        def one(i: int) -> None:
            try:
                results[i] = stream_completion(url, body, api_key)
            except Exception as e:  # noqa: BLE001 - reported below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(c)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise SambayError(f"{len(errors)} of {c} clients failed, e.g. {errors[0]}")
        tokens = sum(r["completion_tokens"] for r in results)
        rows.append({"clients": c, "completion_tokens": tokens, "seconds": round(wall, 3),
                     "tokens_per_second": round(tokens / wall, 1),
                     "per_client_tokens_per_second": round(tokens / wall / c, 1),
                     "mean_ttft_s": round(sum(r["ttft"] or 0 for r in results) / c, 3)})
    return rows


def bench_main(argv: list[str] | None = None) -> int:
    """python -m sambay.server [--bench-clients 1,32] [--bench-tokens 64] [--bench-url URL] [SERVE FLAGS]

    Without --bench-url, starts `sambay serve SERVE FLAGS` on a free loopback port, benchmarks it
    and stops it. Prints a table, then one JSON object as the last line."""
    import tempfile

    p = argparse.ArgumentParser(prog="python -m sambay.server", description=bench_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-clients", default="1,32", help="comma-separated client counts (default 1,32)")
    p.add_argument("--bench-tokens", type=int, default=64, help="tokens each client generates (default 64)")
    p.add_argument("--bench-url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--bench-api-key", default=os.environ.get("SAMBAY_API_KEY"),
                   help="the server's API key [env SAMBAY_API_KEY]")
    args, serve_args = p.parse_known_args(argv)
    clients = [int(c) for c in args.bench_clients.split(",") if c.strip()]
    headers = {"Authorization": f"Bearer {args.bench_api_key}"} if args.bench_api_key else {}
    proc = log = None
    try:
        if args.bench_url:
            url = args.bench_url.rstrip("/")
        else:
            fd, log = tempfile.mkstemp(prefix="sambay-bench-", suffix=".log")
            os.close(fd)
            proc, url = spawn([*serve_args, "--no-access-log", "--max-queue", str(max(clients) + 8)], log)
        wait_ready(url, proc=proc)
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/v1/models", headers=headers)
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        rows = bench_clients(url, model, clients, args.bench_tokens, args.bench_api_key)
    except (SambayError, OSError, KeyError) as e:
        print(f"sambay: error: {e}" + (f" (server log: {log})" if log else ""), file=sys.stderr)
        return 2
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if log:
        os.unlink(log)
    print(f"{'clients':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'tok/s/client':>13} {'ttft s':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['completion_tokens']:>8} {r['seconds']:>8.2f} {r['tokens_per_second']:>8.1f} "
              f"{r['per_client_tokens_per_second']:>13.1f} {r['mean_ttft_s']:>7.3f}")
    print(json.dumps({"bench": "serve", "model": model, "server_args": serve_args, "tokens_per_client":
                      args.bench_tokens, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
