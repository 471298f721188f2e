"""`sambay bench`: decode and prefill speed, held against this machine's measured limits, and the
aggregate speed of `sambay serve` under concurrent clients. (`bench generation` and `bench memory`,
SambaY against its Transformer baseline, live in bench_generation.py.)

Decoding is memory-bound: each step reads every weight plus the decode state. So `bench decode`
measures the machine's read bandwidth in the same run, counts the bytes one step actually reads,
and reports the fraction of that roofline reached. Prefill is compute-bound and is compared with
a large matmul's FLOP rate. `bench serve` starts a server (or uses --url) and has 1, then N clients
stream at once: continuous batching should make N clients together much faster than one. Each
prints a table for people and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
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

from sambay.models.config import CROSS_ATTENTION, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA
from sambay.errors import SambayError
from sambay.kernels.linear import fast_cpu_matmul


def _probe(buf: torch.Tensor) -> float:
    """One read of `buf` with the streaming kernel: bytes/s right now."""
    from sambay.kernels.native import stream_read

    t = time.perf_counter()
    stream_read(buf)
    return buf.numel() * 4 / (time.perf_counter() - t)


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` reads of a buffer far larger than cache."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    _probe(x)
    return max(_probe(x) for _ in range(repeats))


PROBE_BYTES = 512 * 2**20  # far beyond any cache; about 20 ms to read


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_matmul_flops(n: int = 2048, dtype=torch.float32, repeats: int = 3) -> float:
    """FLOP/s of one n x n matmul in `dtype` (the best of `repeats`)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats)


def measure_int8_rows_flops(rows: int = 256, n: int = 4096, repeats: int = 3) -> float:
    """Multiply-add FLOP/s of the native int8 GEMV over many rows, as prefill runs int8 weights
    (kernels.int8_rows_fast): `rows` activation rows against an n x n int8 matrix, the best of `repeats`."""
    from sambay.kernels.native import gemv, tile_int8, tiles_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
    w = tile_int8(w) if tiles_int8() else w
    scale, x = torch.rand(n, generator=g), torch.randn(rows, n, generator=g)
    return 2 * rows * n * n / _best_seconds(lambda: gemv(x, w, scale), repeats)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def decode_bytes_per_step(model, state, batch: int) -> dict[str, int]:
    """Bytes one decode step reads: weights (each once), plus the state each layer reads."""
    emb = model.model.embed_tokens.weight
    weights = sum(_nbytes(t) for name, t in model.state_dict(keep_vars=True).items()
                  if not name.startswith("model.embed_tokens"))
    weights += batch * emb.shape[1] * emb.element_size()  # the embedding rows looked up
    if model.lm_head is None or not any(
            k.startswith("lm_head.") for k in model.state_dict()):  # tied head reads the embedding
        weights += _nbytes(emb)
    cfg = model.config
    ctx = int(state.lengths.max()) + 1
    kv = swa = mamba = 0
    n_readers = sum(k in (KV_ATTENTION, CROSS_ATTENTION) for k in cfg.layer_kinds)
    for i, kind in enumerate(cfg.layer_kinds):
        if kind in (MAMBA, MEMORY_MAMBA):
            mamba += _nbytes(state.conv[i][:batch]) + _nbytes(state.ssm[i][:batch])
        elif state.k[i] is not None:  # K/V of the positions within reach: the context or the window
            slots = state.k[i].shape[2]
            per_pos = (_nbytes(state.k[i][:batch]) + _nbytes(state.v[i][:batch])) / slots
            read = int(per_pos * min(ctx, slots))
            if kind == SWA:
                swa += read
            elif kind == KV_ATTENTION:
                kv = read * n_readers  # the shared K/V is read by every attention reader
            else:  # the Transformer baseline: each layer reads its own K/V
                kv += read
    return {"weights": weights, "shared_kv": kv, "swa_kv": swa, "mamba_state": mamba,
            "total": weights + kv + swa + mamba}


def fill_state_synthetically(model, state, context: int, seed: int = 0) -> None:
    """Make the state look as if `context` tokens had been prefilled (random K/V and SSM states).
    A decode step's cost depends only on the state's size, not on its values."""
    g = torch.Generator().manual_seed(seed)
    for tensors in (state.k, state.v, state.conv):
        for t in tensors:
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.5)
    for t in state.ssm:
        if t is not None:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    state.valid[:, :context] = True
    state.lengths.fill_(context)


def load_for_bench(name: str, dtype: str, quantize: str | None, random_weights: bool = False,
                   seed: int = 0):
    """Load a model folder, repo id or preset (presets always have random weights), ready to decode."""
    from sambay.runtime.checkpoint import load_model
    from sambay.kernels.linear import prepare_for_inference

    t = time.perf_counter()
    print(f"loading {name} ({'random weights, ' if random_weights else ''}{dtype}"
          f"{', int8' if quantize else ''}) ...", file=sys.stderr, flush=True)
    model = load_model(name, dtype=getattr(torch, dtype), random_weights=random_weights, seed=seed)
    prepare_for_inference(model, quantize)
    print(f"loaded in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return model


def _load(args):
    return load_for_bench(args.model or args.preset, args.dtype, args.quantize, args.random_weights)


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


@torch.no_grad()  # the engine's mode, so the same code path is timed
def run_decode(args: argparse.Namespace) -> int:
    from sambay.kernels.native import native_status

    if args.batch < 1 or args.tokens < 1 or args.context < 0:
        raise SambayError("--batch and --tokens must be >= 1 and --context >= 0")
    model = _load(args)
    cfg = model.config
    if args.context + args.tokens + 1 > cfg.max_position_embeddings:
        raise SambayError(f"context {args.context} + tokens {args.tokens} exceeds the model's "
                          f"{cfg.max_position_embeddings}-token context")
    state = model.new_state(args.batch, args.context + args.tokens + args.warmup + 1)
    if args.context:
        fill_state_synthetically(model, state, args.context)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 1))
    kernels = native_status()
    for _ in range(args.warmup):
        ids = model(ids, state=state)[:, -1].argmax(-1, keepdim=True)
    bytes_step = decode_bytes_per_step(model, state, args.batch)  # grows by 1 position per step: negligible
    best_bandwidth = measure_bandwidth()
    # The machine is shared: its bandwidth drifts with the neighbours' load. So each step is held
    # against a probe read just before and just after it, and the median of those ratios is the
    # fraction of the roofline; the best bandwidth of the run gives a second, stricter figure.
    buf = torch.ones(PROBE_BYTES // 4, dtype=torch.float32)
    probes, times = [_probe(buf)], []
    for _ in range(args.tokens):
        t = time.perf_counter()
        ids = model(ids, state=state)[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
        probes.append(_probe(buf))
    best_bandwidth = max(best_bandwidth, measure_bandwidth(), *probes)
    beside = [(a + b) / 2 for a, b in zip(probes, probes[1:])]
    ratios = sorted(bytes_step["total"] / t / bw for t, bw in zip(times, beside))
    step = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    bandwidth = sorted(beside)[len(beside) // 2]
    achieved = bytes_step["total"] / step
    result = {
        "bench": "decode", "model": getattr(model, "source", "?"), "dtype": args.dtype,
        "quantize": args.quantize or "none", "batch": args.batch, "context": args.context,
        "tokens": args.tokens, "threads": torch.get_num_threads(), "kernels": kernels,
        "step_ms": round(step * 1e3, 2), "tokens_per_s": round(args.batch / step, 2),
        "bytes_per_step": bytes_step["total"], "bytes_breakdown": bytes_step,
        "bandwidth_gbs": round(bandwidth / 1e9, 2), "best_bandwidth_gbs": round(best_bandwidth / 1e9, 2),
        "achieved_gbs": round(achieved / 1e9, 2),
        "roofline_tokens_per_s": round(args.batch * bandwidth / bytes_step["total"], 2),
        "roofline_fraction": round(ratios[len(ratios) // 2], 3),
        "roofline_fraction_vs_best": round(achieved / best_bandwidth, 3),
        "context_filled": "synthetic (random K/V and SSM states)" if args.context else "none",
        "steps_ms": [round(t * 1e3, 3) for t in times], "beside_gbs": [round(b / 1e9, 3) for b in beside],
    }
    print(_table([
        ("model", f"{result['model']}  [{args.dtype}{', int8 weights' if args.quantize else ''}]"),
        ("batch / context", f"{args.batch} / {args.context} tokens ({result['context_filled']})"),
        ("kernels / threads", f"{kernels} / {result['threads']}"),
        ("decode step", f"{result['step_ms']} ms (median of {args.tokens})"),
        ("throughput", f"{result['tokens_per_s']} tokens/s"),
        ("bytes read per step", f"{bytes_step['total'] / 1e9:.3f} GB (weights {bytes_step['weights'] / 1e9:.3f}, "
                                f"full-attention K/V {bytes_step['shared_kv'] / 1e9:.3f}, SWA K/V "
                                f"{bytes_step['swa_kv'] / 1e9:.3f}, Mamba {bytes_step['mamba_state'] / 1e9:.4f})"),
        ("memory bandwidth", f"{result['bandwidth_gbs']} GB/s read beside the steps (median; best of the "
                             f"run {result['best_bandwidth_gbs']} GB/s)"),
        ("achieved", f"{result['achieved_gbs']} GB/s = {100 * result['roofline_fraction']:.1f}% of the roofline "
                     f"measured beside each step ({result['roofline_tokens_per_s']} tokens/s); "
                     f"{100 * result['roofline_fraction_vs_best']:.1f}% of the best bandwidth"),
    ]))
    print(json.dumps(result))
    return 0


@contextlib.contextmanager
def counting_linear_flops(model, total: list):
    """Adds to total[0] the multiply-add FLOPs of every linear layer called as a module inside the
    block. Right where a model skips work (SambaY's prefill runs its
    cross-decoder only where logits are kept), unlike 2 x parameters x tokens. Single decode positions
    that run as native blocks (kernels.blocks) are not seen: the cross-decoder's one position of a
    prefill, under 1/tokens of the count."""
    from sambay.kernels.linear import PackedLinear

    def hook(module, inputs, output):
        total[0] += 2 * output.numel() * inputs[0].shape[-1]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, PackedLinear))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def time_prefill(model, n: int, chunk: int, batch: int = 1, seed: int = 0, flops: list | None = None):
    """Seconds to prefill `batch` rows of `n` random tokens into a fresh state, `chunk` tokens per
    call (after a short untimed warm-up); returns (seconds, the filled state). flops: a list whose
    first element gets the linear layers' FLOPs of the timed calls added (counting_linear_flops)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=g)
    state = model.new_state(batch, n)
    model(ids[:, : min(n, 16)], state=model.new_state(batch, n))  # warm-up
    with counting_linear_flops(model, flops) if flops is not None else contextlib.nullcontext():
        t = time.perf_counter()
        for c0 in range(0, n, chunk):
            model(ids[:, c0:c0 + chunk], state=state, logits_to_keep=1)
        return time.perf_counter() - t, state


@torch.no_grad()  # the engine's mode, so the same code path is timed
def run_prefill(args: argparse.Namespace) -> int:
    model = _load(args)
    cfg = model.config
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(n < 1 or n > cfg.max_position_embeddings for n in lengths):
        raise SambayError(f"--lengths must be between 1 and {cfg.max_position_embeddings}")
    from sambay.kernels.native import int8_rows_fast

    if getattr(model, "quantization", None) == "int8" and int8_rows_fast():  # PackedLinear.forward
        compute, flops_peak = "int8", measure_int8_rows_flops()
    else:  # what PackedLinear._matmul multiplies in
        dtype = getattr(torch, args.dtype)
        compute = str(dtype if fast_cpu_matmul(dtype) else torch.float32).removeprefix("torch.")
        flops_peak = measure_matmul_flops(dtype=getattr(torch, compute))
    rows = []
    for n in lengths:
        count = [0]
        sec, state = time_prefill(model, n, args.chunk, flops=count)
        flops = count[0]  # the linear layers'; attention adds a little on top
        rows.append({"tokens": n, "seconds": round(sec, 3), "tokens_per_s": round(n / sec, 1),
                     "gflops": round(flops / sec / 1e9, 1), "state_bytes": state.nbytes()})
        print(f"prefill {n:6d} tokens: {sec:8.2f} s  {n / sec:8.1f} tok/s  {flops / sec / 1e9:7.1f} GFLOP/s  "
              f"state {state.nbytes() / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
    print(_table([("model", getattr(model, "source", "?")), ("matmul peak (measured)",
                                                              f"{flops_peak / 1e9:.1f} GFLOP/s "
                                                              f"({'the int8 GEMV' if compute == 'int8' else compute + ' matmul'}, as prefill computes)")]
                 + [(f"{r['tokens']} tokens", f"{r['seconds']} s, {r['tokens_per_s']} tok/s, "
                                              f"{r['gflops']} GFLOP/s "
                                              f"({100 * r['gflops'] * 1e9 / flops_peak:.0f}% of matmul peak)")
                    for r in rows]))
    print(json.dumps({"bench": "prefill", "model": getattr(model, "source", "?"), "dtype": args.dtype,
                      "quantize": args.quantize or "none", "chunk": args.chunk,
                      "matmul_dtype": compute,
                      "matmul_peak_gflops": round(flops_peak / 1e9, 1), "results": rows}))
    return 0


# ---------------------------------------------------------------------------------------------
# bench serve: aggregate generation speed of `sambay serve` with N concurrent clients
# ---------------------------------------------------------------------------------------------


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


# The `sambay serve` flags `bench serve` passes on to the server it starts (None: the server's default,
# which also follows the server's SAMBAY_* environment variables).
SERVE_FLAGS = ("model", "dtype", "quantize", "random_weights", "max_batch_size", "max_model_len")


def _serve_args(args: argparse.Namespace) -> list[str]:
    """The `sambay serve` command line for the server `bench serve` starts."""
    out = []
    for name in SERVE_FLAGS:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        out += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if getattr(args, "threads", 0):
        out += ["--threads", str(args.threads)]
    if args.api_key:
        out += ["--api-key", args.api_key]
    return out


def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise SambayError(f"--clients must be comma-separated client counts of at least 1, such as 1,32; "
                          f"got {text!r}")
    return counts


def run_serve(args: argparse.Namespace) -> int:
    """Without --url, starts `sambay serve` on a free loopback port, benchmarks it and stops it."""
    clients = _client_counts(args.clients)
    if args.tokens < 1:
        raise SambayError(f"--tokens must be at least 1, got {args.tokens}")
    given = [f"--{n.replace('_', '-')}" for n in SERVE_FLAGS if getattr(args, n) not in (None, False)]
    if args.url and given:
        raise SambayError(f"{', '.join(given)} only set up the server that bench serve starts, but --url "
                          f"measures a running server as it is; drop {', '.join(given)} or drop --url")
    serve_args = [] if args.url else _serve_args(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = log = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            fd, log = tempfile.mkstemp(prefix="sambay-bench-", suffix=".log")
            os.close(fd)
            print(f"starting sambay serve {' '.join(serve_args)} ...", file=sys.stderr, flush=True)
            proc, url = spawn([*serve_args, "--no-access-log", "--max-queue", str(max(clients) + 8)], log)
        wait_ready(url, proc=proc)
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/v1/models", headers=headers)
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        rows = bench_clients(url, model, clients, args.tokens, args.api_key)
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
                      args.tokens, "results": rows}))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or Hugging Face repo id")
    p.add_argument("--preset", default="phi4-mini-flash", help="preset to use when --model is not given")
    p.add_argument("--random-weights", action="store_true", help="random weights (no download needed)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 for every linear layer and the head")


def register(sub) -> None:
    bench = sub.add_parser("bench", help="measure decode / prefill speed against this machine's limits, "
                                         "and the server's speed under concurrent clients")
    bsub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    d = bsub.add_parser("decode", help="decode tokens/s and fraction of the memory-bandwidth roofline")
    _common(d)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--context", type=int, default=0, help="tokens already in the state before timing")
    d.add_argument("--tokens", type=int, default=32,
                   help="decode steps to time (default 32, so that the median holds against noisy neighbours)")
    d.add_argument("--warmup", type=int, default=2)
    d.set_defaults(func=run_decode)
    p = bsub.add_parser("prefill", help="prefill tokens/s for several prompt lengths")
    _common(p)
    p.add_argument("--lengths", default="128,512,2048")
    p.add_argument("--chunk", type=int, default=512, help="tokens per prefill call")
    p.set_defaults(func=run_prefill)
    s = bsub.add_parser(
        "serve", help="aggregate tokens/s of `sambay serve` with 1, then N concurrent streaming clients",
        description="Start `sambay serve` on a free loopback port (or use --url), have each count of "
                    "--clients stream --tokens greedy tokens at once, print tokens/s per count, stop the server.")
    s.add_argument("--clients", default="1,32", metavar="N,N,...",
                   help="comma-separated client counts (default 1,32)")
    s.add_argument("--tokens", type=int, default=64, metavar="N", help="tokens each client generates (default 64)")
    s.add_argument("--url", help="measure this running server instead of starting one")
    s.add_argument("--api-key", default=os.environ.get("SAMBAY_API_KEY"), metavar="KEY",
                   help="the server's API key; given to the server started [env SAMBAY_API_KEY]")
    s.add_argument("--model", metavar="PATH|REPO|PRESET", help="model folder, Hugging Face repo id, or preset "
                   "with --random-weights (default: the embedded model)")
    s.add_argument("--random-weights", action="store_true", help="random weights of the model's shape")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the checkpoint's)")
    s.add_argument("--quantize", choices=["int8"], help="quantize the weights after loading")
    s.add_argument("--max-batch-size", type=int, metavar="N",
                   help="requests the server decodes together (its default: 8)")
    s.add_argument("--max-model-len", type=int, metavar="N", help="tokens per request, prompt + completion")
    s.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="the server's CPU threads (same as `sambay --threads N bench serve`)")
    s.set_defaults(func=run_serve)
    from sambay.bench import generation as bench_generation  # generation, memory: SambaY against its baseline

    bench_generation.register(bsub)
