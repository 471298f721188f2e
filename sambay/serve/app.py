"""The OpenAI routes as a FastAPI app, behind the Gate (sambay/serve/gate.py).

Endpoints: GET / (the chat page, sambay/serve/static/index.html), GET /health (503 until the
model is loaded, then 200), GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions
and POST /v1/chat/completions ("stream": true gives server-sent events ending in `data: [DONE]`).

Route handlers stay thin: a request body (a model in sambay/serve/protocol.py) becomes prompt ids
and one SamplingParams, then one Job per choice for the scheduler; the Jobs' Outputs become OpenAI
JSON through sambay/serve/responses.py. Every error has OpenAI's shape, {"error": {"message",
"type", "param", "code"}} (`protocol.APIError`), and never disturbs other requests.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) to
# know what to pass them.

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from sambay.runtime.sampling import SamplingParams
from sambay.serve.gate import Gate
from sambay.serve.protocol import (AnyRequest, APIError, ChatCompletionRequest, ChatPrompt, CompletionRequest,
                                   chat_prompt, choice_params, completion_prompts, parse_json, sampling_params)
from sambay.serve.reasoning import CLOSE_TEXT, ThinkingBudget
from sambay.serve.responses import SSE_DONE, Reply, StreamChunks, output_error, response_body, sse
from sambay.serve.scheduler import Job, Output, outputs_of
from sambay.serve.settings import Settings
from sambay.serve.state import ServerState

# The chat page at GET /: one static file shipped in the package (no build step, no CDN).
CHAT_PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(settings: Settings, state: ServerState | None = None) -> Gate:
    """The FastAPI app, wrapped in the Gate (API key, body size, access log, request metrics)."""
    state = state or ServerState(settings)

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        await run_in_threadpool(state.scheduler.stop)

    app = FastAPI(title="sambay", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.sambay = state
    app.openapi = lambda: openapi_schema(app)

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

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

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

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        state.check_model(name)
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_json(await request.body(), ChatCompletionRequest)
        state.check_model(req.model)
        info = state.ready_info()
        prompt = await run_in_threadpool(chat_prompt, req, info.tokenizer)
        return await run_request(state, request, req, [prompt.ids], prompt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_json(await request.body(), CompletionRequest)
        state.check_model(req.model)
        info = state.ready_info()
        prompts = await run_in_threadpool(completion_prompts, req, info)
        return await run_request(state, request, req, prompts)

    return Gate(app, state)


def openapi_schema(app: FastAPI) -> dict:
    """GET /openapi.json: FastAPI's schema plus the two POST routes' request bodies, which it cannot
    see because the handlers parse the body themselves (to answer every error in OpenAI's shape), so
    that clients and schema-driven tools (schemathesis in tests/test_fuzz.py) know what to send."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)):
            body = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {"required": True,
                                                            "content": {"application/json": {"schema": ref}}}
        app.openapi_schema = schema
    return app.openapi_schema


# ---------------------------------------------------------------------------------------------
# One request: its jobs, answered as JSON or as a stream
# ---------------------------------------------------------------------------------------------


async def run_request(state: ServerState, request: Request, req: AnyRequest, prompts: list[list[int]],
                      chat_turn: ChatPrompt | None = None) -> Response:
    """Submit one request's jobs and answer with JSON or a stream."""
    chat = isinstance(req, ChatCompletionRequest)
    params = sampling_params(req, max(len(p) for p in prompts), state.info)
    jobs = _jobs(prompts, params, req.n)
    replies, budgets = _replies(state, req, chat_turn, jobs) if chat else (None, None)
    state.submit(jobs)
    prompt_tokens = sum(len(p) for p in prompts)
    record = request.scope.setdefault("sambay", {})  # for the access log (the Gate writes it)
    record["prompt_tokens"] = prompt_tokens
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = StreamChunks(rid, chat, state.model_name, include_usage, state.text_of)
        return StreamingResponse(stream(state, jobs, chunks, prompt_tokens, record, replies, budgets),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await collect(state, jobs, request)
    if results is None:
        record["disconnected"] = True
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    for out in results:
        if out.error:
            raise output_error(out)
    record["completion_tokens"] = sum(out.completion_tokens for out in results)
    return JSONResponse(response_body(rid, chat, state.model_name, [(j.index, out) for j, out in zip(jobs, results)],
                                      prompt_tokens, state.text_of, replies, _reasoning_tokens(budgets)))


def _replies(state: ServerState, req: ChatCompletionRequest, turn: ChatPrompt,
             jobs: list[Job]) -> tuple[list[Reply], list[ThinkingBudget] | None]:
    """Each chat job's Reply (its text into reasoning_content / content / tool_calls) and, when the
    thinking is parsed, its ThinkingBudget hook on the scheduler thread (reasoning tokens, budget)."""
    reasoning = state.settings.reasoning_format == "auto"
    tools = bool(req.tools) and req.tool_choice != "none"
    replies = [Reply(reasoning, turn.thinking, tools, turn.prefix) for _ in jobs]
    if not reasoning:
        return replies, None
    budget = req.reasoning_budget if req.reasoning_budget is not None else state.settings.reasoning_budget
    budget = None if budget is None or budget < 0 else budget
    close_ids = state.info.tokenizer.encode(CLOSE_TEXT)
    budgets = []
    for job in jobs:
        job.on_token = ThinkingBudget(close_ids, budget, turn.thinking)
        budgets.append(job.on_token)
    return replies, budgets


def _reasoning_tokens(budgets: list[ThinkingBudget] | None) -> int | None:
    return None if budgets is None else sum(b.reasoning_tokens for b in budgets)


def _jobs(prompts: list[list[int]], params: SamplingParams, n: int) -> list[Job]:
    """n jobs per prompt, sharing one queue; choice k * n + i is prompt k's i-th choice."""
    queue: asyncio.Queue = asyncio.Queue()
    return [Job(prompt, p, index=k * n + i, queue=queue)
            for k, prompt in enumerate(prompts) for i, p in enumerate(choice_params(params, n))]


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(state: ServerState, jobs: list[Job], request: Request) -> list[Output] | None:
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


async def stream(state: ServerState, jobs: list[Job], chunks: StreamChunks, prompt_tokens: int,
                 record: dict, replies: list[Reply] | None = None,
                 budgets: list[ThinkingBudget] | None = None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per increment, a chunk with finish_reason per choice, an
    optional usage chunk, then [DONE]. Leaving early (the client went away) cancels the jobs.
    A chat choice's increments go through its Reply, so each delta carries its own field."""
    tokens = {job: 0 for job in jobs}
    reply_of = dict(zip(jobs, replies)) if replies else {}
    try:
        if chunks.chat:
            yield chunks.roles([j.index for j in jobs])
        async for job, out in outputs_of(jobs):
            tokens[job] = out.completion_tokens or tokens[job]
            if out.error:
                yield sse(output_error(out).body())
                break
            reply = reply_of.get(job)
            finish = out.finish_reason
            if reply is not None:
                text = chunks.deltas(job.index, reply.push(out.text, final=finish is not None), out.logprobs)
                if text:
                    yield text
                finish = reply.finish_reason(finish)
            elif out.text or out.logprobs:
                yield chunks.piece(job.index, out.text, out.logprobs)
            if finish:
                yield chunks.piece(job.index, "", None, finish)
        else:
            if chunks.include_usage:
                yield chunks.usage(prompt_tokens, sum(tokens.values()), _reasoning_tokens(budgets))
        yield SSE_DONE
    except asyncio.CancelledError:  # the client went away (or shutdown ran out of time)
        record["disconnected"] = True
        raise
    finally:
        for job in jobs:
            state.scheduler.cancel(job)
        record["completion_tokens"] = sum(tokens.values())
