"""The OpenAI-compatible server over the engine, with continuous batching.

    settings.py   Settings: what `sambay serve` is told (the flags live in sambay/cli/serve.py)
    server.py     serve(settings): listen, run uvicorn, stop cleanly on SIGINT/SIGTERM
    app.py        the routes (FastAPI) and the way one request runs: JSON or server-sent events
    gate.py       the ASGI middleware in front: API key, request size, access log, request counts
    protocol.py   request bodies (pydantic) -> prompt ids and SamplingParams; APIError
    responses.py  the engine's outputs -> OpenAI JSON and stream chunks
    state.py      ServerState: loading the model on the scheduler thread, what the handlers share
    scheduler.py  the thread that owns the Engine and batches every request's decode steps
    metrics.py    the counters behind GET /metrics

Only settings.py is free of the `serve` extra (fastapi, pydantic, uvicorn); this package's
__init__ imports nothing, so the CLI can read Settings without it.
"""
