"""`sambay serve`: an OpenAI-compatible HTTP server over the engine, with continuous batching.

    sambay serve --model path/to/Phi-4-mini-flash-reasoning --quantize int8
    curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "Phi-4-mini-flash-reasoning",
                                                "messages": [{"role": "user", "content": "Hi"}]}'
    sambay bench serve --clients 1,32 --model DIR   # aggregate tokens/s (sambay/bench.py)

Endpoints: GET /health (503 until the model is loaded, then 200), GET /metrics (Prometheus text),
GET /v1/models, POST /v1/completions and POST /v1/chat/completions ("stream": true gives
server-sent events ending in `data: [DONE]`). Every flag has an environment twin (SAMBAY_PORT, ...).

The server starts listening at once and loads the model on the scheduler thread (sambay/scheduler.py),
which then owns the Engine and batches every request's decode steps. Route handlers stay thin: a
request body (a model in sambay/protocol.py) becomes prompt ids and one SamplingParams
(`protocol.sampling_params`), then one Job per choice; the Jobs' Outputs become OpenAI JSON here.
Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}} (`protocol.APIError`),
and never disturbs other requests.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real annotations
# (Request), which are imported inside create_app so `sambay --help` never imports fastapi.

import argparse
import asyncio
import dataclasses
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sambay.errors import SambayError
from sambay.serve.protocol import (SEED_RANGE, AnyRequest, APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                       ModelInfo, parse_request, sampling_params)
from sambay.runtime.sampling import SamplingParams
from sambay.serve.scheduler import Job, Metrics, NotAccepting, Output, QueueFull, Scheduler, TokenLogprob, outputs_of

DEFAULT_MAX_MODEL_LEN = 8192  # tokens per batch row (prompt + completion) unless --max-model-len
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


# ---------------------------------------------------------------------------------------------
# Request -> prompt ids (the SamplingParams come from protocol.sampling_params)
# ---------------------------------------------------------------------------------------------


async def parse_body(request, model: type) -> Any:
    """The request's JSON as `model` (any content type: `curl -d` sends form-urlencoded)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"the request body is not valid JSON ({getattr(e, 'msg', e)}{where}); "
                            f"send one JSON object") from None
    return parse_request(model, data)


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
        from sambay.tokenizer import _bytes_to_unicode

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
        from sambay.runtime.engine import Engine
        from sambay.runtime.load import load_for_inference

        s = self.settings
        if s.load_delay:
            time.sleep(s.load_delay)
        model, tokenizer = load_for_inference(s.model, dtype=s.dtype, quantize=s.quantize,
                                              random_weights=s.random_weights)
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
    from sambay.runtime.checkpoint import resolve_model

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
