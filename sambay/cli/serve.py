"""`sambay serve`: the flags of the OpenAI-compatible server, each with an environment twin (SAMBAY_PORT,
...), turned into one sambay.serve.settings.Settings for sambay.serve.server.serve.

The server needs the `serve` extra (fastapi, pydantic, uvicorn); this module does not, so
`sambay serve --help` works without it and `sambay serve` says in one line what to install.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from sambay.errors import SambayError
from sambay.serve.settings import DEFAULT_MAX_MODEL_LEN, Settings

DESCRIPTION = ("Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
               "/v1/models; /health, /metrics) with continuous batching. Listens at once and loads the model "
               "in the background: /health says 503 until it is ready. SIGINT/SIGTERM stop accepting, let "
               "running requests finish (--shutdown-timeout), and exit 0.")


def add_serve(p: argparse.ArgumentParser) -> None:
    """The serve flags; each takes its default from the environment variable named in its help."""
    p.description = DESCRIPTION
    d = Settings()  # the defaults

    def flag(name: str, env: str, help: str, default: Any = None, **kw) -> None:
        shown = "" if default is None else f", default {default}"
        p.add_argument(name, default=os.environ.get(env, default), help=f"{help} [env {env}{shown}]", **kw)

    flag("--model", "SAMBAY_MODEL", "model folder, Hugging Face repo id, or preset with --random-weights "
         "(default: the embedded model)", metavar="PATH|REPO|PRESET")
    flag("--served-model-name", "SAMBAY_SERVED_MODEL_NAME",
         "the name clients send as \"model\" (default: the model folder's name)", metavar="NAME")
    flag("--host", "SAMBAY_HOST", "address to listen on; anything but loopback exposes the server", d.host)
    flag("--port", "SAMBAY_PORT", "port to listen on (0: any free port, printed at start)", d.port, type=int)
    flag("--api-key", "SAMBAY_API_KEY", "require 'Authorization: Bearer KEY' on /v1/* (default: no key)",
         metavar="KEY")
    flag("--dtype", "SAMBAY_DTYPE", "weight dtype (default: the checkpoint's)", choices=["float32", "bfloat16"])
    flag("--quantize", "SAMBAY_QUANTIZE", "quantize the weights after loading", choices=["int8", "int4"])
    p.add_argument("--random-weights", action="store_true", default=_env_flag("SAMBAY_RANDOM_WEIGHTS"),
                   help="random weights of the model's shape (for a preset) [env SAMBAY_RANDOM_WEIGHTS=1]")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="CPU threads for PyTorch (same as `sambay --threads N serve`) [env SAMBAY_THREADS]")
    flag("--max-batch-size", "SAMBAY_MAX_BATCH_SIZE", "requests decoded together (rows of the batch)",
         d.max_batch_size, type=int, metavar="N")
    flag("--max-queue", "SAMBAY_MAX_QUEUE", "requests that may wait for a row; more get 429", d.max_queue,
         type=int, metavar="N")
    flag("--max-model-len", "SAMBAY_MAX_MODEL_LEN", f"tokens per request, prompt + completion (default: the "
         f"model's context, at most {DEFAULT_MAX_MODEL_LEN}); sizes the decode state", type=int, metavar="N")
    flag("--max-tokens", "SAMBAY_MAX_TOKENS", "the most tokens one request may ask to generate (default: what "
         "the context leaves, also a chat request's default max_tokens)", d.max_tokens, type=int, metavar="N")
    flag("--reasoning-format", "SAMBAY_REASONING_FORMAT", "auto: a reply's <think>...</think> goes to "
         "message.reasoning_content (and streamed deltas), the rest to content; none: all of it is content",
         d.reasoning_format, choices=["auto", "none"])
    flag("--reasoning-budget", "SAMBAY_REASONING_BUDGET", "the most tokens a reply may think before </think> is "
         "forced and the model answers (0: no thinking; a request's \"reasoning_budget\" overrides it; default: "
         "no limit)", type=int, metavar="N")
    flag("--prefill-chunk", "SAMBAY_PREFILL_CHUNK", "prompt tokens prefilled per scheduler iteration, "
         "between two decode steps of the running requests: a long prompt delays each stream by about "
         "one such chunk per token (smaller: smoother streams, slower prefill)", d.prefill_chunk,
         type=int, metavar="N")
    flag("--prefix-cache-mb", "SAMBAY_PREFIX_CACHE_MB", "memory for the prefix-state cache (MiB): a prompt "
         "starting like an earlier one (a chat's history, a shared system prompt) restores that decode "
         "state and prefills only the rest; 0 turns it off", d.prefix_cache_mb, type=float, metavar="MB")
    flag("--max-request-bytes", "SAMBAY_MAX_REQUEST_BYTES", "largest request body accepted; more get 413",
         d.max_request_bytes, type=int, metavar="N")
    flag("--shutdown-timeout", "SAMBAY_SHUTDOWN_TIMEOUT", "seconds in-flight requests get to finish on "
         "SIGINT/SIGTERM before they are cancelled", d.shutdown_timeout, type=float, metavar="S")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   default=not _env_flag("SAMBAY_NO_ACCESS_LOG"),
                   help="do not print a JSON line per request on stderr [env SAMBAY_NO_ACCESS_LOG=1]")
    p.add_argument("--load-delay", type=float, default=float(os.environ.get("SAMBAY_LOAD_DELAY", 0)),
                   help=argparse.SUPPRESS)  # testing: wait this long before loading
    p.set_defaults(func=run_serve)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)})


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    settings.check()
    try:
        # An optional dependency: the server needs the `serve` extra, which `--help` does not.
        from sambay.serve.server import serve
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] == "sambay":
            raise
        raise SambayError(f"sambay serve needs fastapi and uvicorn ({e.name} is missing): "
                          f"pip install 'sambay[serve]'") from None
    return serve(settings)
