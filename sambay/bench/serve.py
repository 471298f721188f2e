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

import torch

from sambay.bench.common import table
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


def stream_completion(url: str, body: dict, api_key: str | None = None, timeout: float = 300.0,
                      path: str = "/v1/completions", stop: threading.Event | None = None) -> dict:
    """POST a streaming /v1/completions (or chat, by `path`) with the standard library; returns the
    text, the completion tokens (from the usage chunk), time to first text, total seconds and the
    perf_counter time of each piece of text. Once `stop` is set it hangs up (the server frees the row)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", **_headers(api_key)}
    start = time.perf_counter()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", path, json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SambayError(f"the server answered {resp.status}: {resp.read()[:500]!r}")
    text, tokens, first, stamps = [], 0, None, []
    for line in resp:
        if stop is not None and stop.is_set():
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
        for c in obj.get("choices", []):
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            if piece:
                stamps.append(time.perf_counter())
                if first is None:
                    first = stamps[-1] - start
                text.append(piece)
    conn.close()
    return {"text": "".join(text), "completion_tokens": tokens, "ttft": first,
            "seconds": time.perf_counter() - start, "stamps": stamps}


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


# ---------------------------------------------------------------------------------------------
# Scenarios: long prompts among running streams, a chat's second turn, n choices
# ---------------------------------------------------------------------------------------------


def _ids(n: int, seed: int) -> list[int]:
    """n prompt token ids, different per seed, so the prefix cache never serves one for another."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 1000, (n,), generator=g).tolist()


def _post(url: str, path: str, body: dict, api_key: str | None) -> dict:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **_headers(api_key)})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise SambayError(f"the server answered {resp.status}: {data[:500]!r}")
    return json.loads(data)


def _metrics(url: str) -> dict[str, float]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/metrics")
    out = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def long_prompt_gaps(url: str, model: str, prompt_tokens: int, chunk: int, stream_tokens: int,
                     streams: int = 4, api_key: str | None = None) -> dict:
    """`streams` greedy streams decode; a prompt_tokens-long prompt arrives. Returns each stream's
    largest gap between tokens while it is prefilled, the median gap before it (one decode step of
    the batch) and the time to first token of a `chunk`-token prompt alone (one prefill chunk and
    one decode step), which the gap is held against."""
    alone = [stream_completion(url, {"model": model, "prompt": _ids(chunk, 1000 + i), "max_tokens": 1},
                               api_key)["ttft"] for i in range(3)]
    stop, results = threading.Event(), [None] * streams
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": stream_tokens, "temperature": 0,
            "ignore_eos": True}

    def one(i: int) -> None:
        try:
            results[i] = stream_completion(url, body, api_key, stop=stop)
        except (SambayError, OSError) as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # every stream decoding
    arrive = time.perf_counter()
    long = stream_completion(url, {"model": model, "prompt": _ids(prompt_tokens, 7), "max_tokens": 1}, api_key)
    done = time.perf_counter()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    before, during = [], []
    for r in results:
        if isinstance(r, Exception):
            raise SambayError(f"a decoding stream failed: {r}")
        gaps = [(b, b - a) for a, b in zip(r["stamps"], r["stamps"][1:])]
        before += [g for b, g in gaps if b < arrive]
        during.append(max((g for b, g in gaps if arrive <= b <= done + 0.5), default=0.0))
    before.sort()
    step = before[len(before) // 2] if before else float("nan")
    chunk_and_step = sorted(alone)[1]
    return {"prompt_tokens": prompt_tokens, "prefill_chunk": chunk, "streams": streams,
            "decode_step_s": round(step, 4), "chunk_prefill_and_step_s": round(chunk_and_step, 4),
            "long_prompt_ttft_s": round(long["ttft"] or done - arrive, 3),
            "max_gap_per_stream_s": [round(g, 4) for g in during],
            "max_gap_over_step_plus_chunk": round(max(during) / max(chunk_and_step, step), 2)}


def chat_second_turn(url: str, model: str, history_tokens: int, api_key: str | None = None) -> dict:
    """A chat's second turn over a history_tokens-long first message: its time to first token and
    its greedy reply (to compare with the same on a server without the cache), and the cache's bytes."""
    words = "the old lighthouse keeper climbed winding stairs every evening to light lamp while ships slept".split()

    def text(n: int, seed: int) -> str:
        return " ".join(words[i % len(words)] for i in _ids(n, seed))

    probe = _post(url, "/v1/chat/completions", {"model": model, "max_tokens": 1, "temperature": 0,
                                                "messages": [{"role": "user", "content": text(500, 3)}]}, api_key)
    n_words = int(500 * history_tokens / probe["usage"]["prompt_tokens"])
    first = [{"role": "user", "content": text(n_words, 4)}]
    body = {"model": model, "max_tokens": 16, "temperature": 0}
    turn1 = _post(url, "/v1/chat/completions", {**body, "messages": first}, api_key)
    reply = turn1["choices"][0]["message"]["content"] or ""
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And what then?"}]
    turn2 = stream_completion(url, {**body, "messages": second}, api_key, path="/v1/chat/completions")
    m = _metrics(url)
    return {"history_tokens": turn1["usage"]["prompt_tokens"], "ttft_s": round(turn2["ttft"], 4),
            "reply": turn2["text"], "cache_bytes": m.get("sambay_prefix_cache_bytes", 0),
            "cache_budget_bytes": m.get("sambay_prefix_cache_budget_bytes", 0),
            "cache_hit_tokens": m.get("sambay_prefix_cache_hit_tokens_total", 0)}


def shared_prefill(url: str, model: str, prompt_tokens: int, api_key: str | None = None) -> dict:
    """n = 4 against n = 1 on prompts of prompt_tokens (each new, so nothing is cached): seconds of
    one token each, and whether n = 4's choices equal n = 1 requests with their seeds (seed + i)."""
    body = {"model": model, "temperature": 0.8, "seed": 11}
    _post(url, "/v1/completions", {**body, "prompt": _ids(64, 20), "max_tokens": 1}, api_key)  # warm-up
    timed = {}
    for n, seed in ((1, 21), (4, 22), (1, 23), (4, 24)):
        t = time.perf_counter()
        _post(url, "/v1/completions", {**body, "prompt": _ids(prompt_tokens, seed), "max_tokens": 1, "n": n}, api_key)
        timed[n] = min(timed.get(n, float("inf")), time.perf_counter() - t)
    prompt = _ids(256, 30)
    four = _post(url, "/v1/completions", {**body, "prompt": prompt, "max_tokens": 8, "n": 4}, api_key)
    rows = [c["text"] for c in sorted(four["choices"], key=lambda c: c["index"])]
    alone = [_post(url, "/v1/completions", {**body, "seed": 11 + i, "prompt": prompt, "max_tokens": 8},
                   api_key)["choices"][0]["text"] for i in range(4)]
    return {"prompt_tokens": prompt_tokens, "n1_s": round(timed[1], 3), "n4_s": round(timed[4], 3),
            "n4_over_n1": round(timed[4] / timed[1], 2), "rows_equal_seeded_n1": rows == alone}


def bench_scenarios(*, serve_args: Sequence[str] = (), prompt_tokens: int = 4096, chunk: int = 256,
                    history_tokens: int = 2000, cache_mb: float = 512.0, api_key: str | None = None) -> dict:
    """`bench serve --scenarios`: each scenario against servers started with SERVE_ARGS: the long
    prompt with --prefill-chunk `chunk` and with it whole; the chat's second turn with the prefix
    cache and without; n = 4 against n = 1. Prints a table per scenario and the JSON line."""
    result = {"bench": "serve-scenarios", "server_args": list(serve_args)}

    def on_server(extra: list[str], fn):
        fd, log = tempfile.mkstemp(prefix="sambay-bench-", suffix=".log")
        os.close(fd)
        print(f"starting sambay serve {' '.join([*serve_args, *extra])} ...", file=sys.stderr, flush=True)
        proc, url = spawn([*serve_args, *extra, "--no-access-log"], log)
        try:
            wait_ready(url, timeout=900, proc=proc)
            model = served_model(url, api_key)
            return fn(url, model)
        except (SambayError, OSError, KeyError) as e:
            raise SambayError(f"{e} (server log: {log})") from None
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    def max_len(url, model):
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/v1/models", headers=_headers(api_key))
        return json.loads(conn.getresponse().read())["data"][0].get("max_model_len", prompt_tokens + 2)

    cache = ["--prefix-cache-mb", f"{cache_mb:g}"]
    context = on_server(cache, max_len)
    tokens = min(prompt_tokens, context - 2)  # the long prompt, and room for the streams' tokens
    chunked = on_server([*cache, "--prefill-chunk", str(chunk)],
                        lambda u, m: long_prompt_gaps(u, m, tokens, chunk, context - 16, api_key=api_key))
    whole = on_server([*cache, "--prefill-chunk", str(tokens)],
                      lambda u, m: long_prompt_gaps(u, m, tokens, tokens, context - 16, api_key=api_key))
    with_cache = on_server(cache, lambda u, m: chat_second_turn(u, m, history_tokens, api_key))
    no_cache = on_server(["--prefix-cache-mb", "0"], lambda u, m: chat_second_turn(u, m, history_tokens, api_key))
    n = on_server(["--prefix-cache-mb", "0"], lambda u, m: shared_prefill(u, m, min(1024, tokens), api_key))
    print(f"1. {tokens}-token prompt among 4 decoding streams")
    print(table([("chunked: decode step (s)", f"{chunked['decode_step_s']}"),
                 (f"chunked: one {chunk}-token chunk + step (s)", f"{chunked['chunk_prefill_and_step_s']}"),
                 ("chunked: largest gap per stream (s)", " ".join(map(str, chunked["max_gap_per_stream_s"]))),
                 ("chunked: gap / (step + chunk)", f"{chunked['max_gap_over_step_plus_chunk']}"),
                 ("whole prefill: largest gap per stream (s)", " ".join(map(str, whole["max_gap_per_stream_s"]))),
                 ("whole prefill: the prompt's time to first token (s)", f"{whole['long_prompt_ttft_s']}")]))
    print(f"2. second turn of a chat over {with_cache['history_tokens']} tokens")
    print(table([("time to first token, cache / no cache (s)", f"{with_cache['ttft_s']} / {no_cache['ttft_s']}"),
                 ("speed-up", f"{no_cache['ttft_s'] / with_cache['ttft_s']:.1f}x"),
                 ("replies identical", f"{with_cache['reply'] == no_cache['reply']}"),
                 ("cache bytes / budget (MiB)", f"{with_cache['cache_bytes'] / 2**20:.1f} / "
                                                f"{with_cache['cache_budget_bytes'] / 2**20:.0f}")]))
    print(f"3. n = 4 against n = 1 ({n['prompt_tokens']}-token prompts, one token)")
    print(table([("seconds n = 1 / n = 4", f"{n['n1_s']} / {n['n4_s']} ({n['n4_over_n1']}x)"),
                 ("n = 4 rows equal seeded n = 1 requests", f"{n['rows_equal_seeded_n1']}")]))
    result.update({"long_prompt": {"chunked": chunked, "whole": whole},
                   "chat": {"cache": with_cache, "no_cache": no_cache,
                            "speedup": round(no_cache["ttft_s"] / with_cache["ttft_s"], 2),
                            "identical": with_cache["reply"] == no_cache["reply"],
                            "under_budget": with_cache["cache_bytes"] <= with_cache["cache_budget_bytes"]},
                   "n": n})
    print(json.dumps(result))
    return result
