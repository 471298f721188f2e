"""`sambay bench serve`: the aggregate generation speed of `sambay serve` under concurrent clients.

It starts a server on a free loopback port (or measures a running one), has each count of clients
stream the same number of greedy tokens at once, and reports tokens/s per count: continuous
batching should make N clients together much faster than one. The clients use the standard
library only, so the benchmark measures the server, not a client library. `spawn` and
`wait_ready` also start the server for the server tests.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from sambay.errors import SambayError


def spawn(serve_args: Sequence[str], log_path: str | os.PathLike, timeout: float = 120.0,
          env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `sambay serve --port 0 SERVE_ARGS` as a child process, its stderr going to log_path;
    return the process and its base URL once it listens (the model may still be loading)."""
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "sambay", "serve", "--port", "0", *serve_args]
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


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_model(url: str, api_key: str | None = None) -> str:
    """The id of the (first) model the server at `url` lists."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/v1/models", headers=_headers(api_key))
    return json.loads(conn.getresponse().read())["data"][0]["id"]


def stream_completion(url: str, body: dict, api_key: str | None = None, timeout: float = 300.0) -> dict:
    """POST a streaming /v1/completions with the standard library; returns the text, the
    completion tokens (from the usage chunk), time to first text and total seconds."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", **_headers(api_key)}
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


def bench_serve(*, url: str | None = None, serve_args: Sequence[str] = (), clients: Sequence[int] = (1, 32),
                tokens: int = 64, api_key: str | None = None) -> dict:
    """Measure the server at `url`, or (url None) start `sambay serve SERVE_ARGS` on a free loopback
    port, measure it and stop it. Prints the table and the JSON line; returns the JSON object.
    A failure names the server's log, which is kept for reading."""
    if tokens < 1:
        raise SambayError(f"--tokens must be at least 1, got {tokens}")
    serve_args = list(serve_args)
    proc = log = None
    try:
        if url:
            url = url.rstrip("/")
        else:
            fd, log = tempfile.mkstemp(prefix="sambay-bench-", suffix=".log")
            os.close(fd)
            print(f"starting sambay serve {' '.join(serve_args)} ...", file=sys.stderr, flush=True)
            proc, url = spawn([*serve_args, "--no-access-log", "--max-queue", str(max(clients) + 8)], log)
        wait_ready(url, proc=proc)
        model = served_model(url, api_key)
        rows = bench_clients(url, model, clients, tokens, api_key)
    except (SambayError, OSError, KeyError) as e:
        raise SambayError(f"{e}" + (f" (server log: {log})" if log else "")) from None
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
    result = {"bench": "serve", "model": model, "server_args": serve_args, "tokens_per_client": tokens,
              "results": rows}
    print(json.dumps(result))
    return result
