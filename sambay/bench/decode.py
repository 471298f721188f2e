"""`sambay bench decode`: decode speed, held against this machine's measured read bandwidth.

Decoding is memory-bound: each step reads every weight plus the decode state. So the benchmark
measures the machine's read bandwidth in the same run, counts the bytes one step actually reads,
and reports the fraction of that roofline reached. It prints a table for people and one JSON
object as its last line. (`bench prefill` is in prefill.py, `bench serve` in serve.py, `bench
generation` and `bench memory` in generation.py.)
"""

from __future__ import annotations

import json
import time

import torch

from sambay.bench.common import (PROBE_BYTES, decode_bytes_per_step, fill_state_synthetically, load,
                                 measure_bandwidth, probe_bandwidth, table)
# Re-exported for tests/test_server.py and tests/test_server_load.py, which still import the server
# helpers from here; they live in sambay.bench.serve.
from sambay.bench.serve import bench_clients, spawn, wait_ready  # noqa: F401
from sambay.errors import SambayError
from sambay.kernels import native_status


@torch.no_grad()  # the engine's mode, so the same code path is timed
def bench_decode(model_name: str, *, dtype: str = "bfloat16", quantize: str | None = None,
                 random_weights: bool = False, batch: int = 1, context: int = 0, tokens: int = 32,
                 warmup: int = 2) -> dict:
    """Time `tokens` decode steps of `batch` rows after `context` positions of synthetic state;
    print the table and the JSON line, and return the JSON object."""
    if batch < 1 or tokens < 1 or context < 0:
        raise SambayError("--batch and --tokens must be >= 1 and --context >= 0")
    model = load(model_name, dtype, quantize, random_weights)
    cfg = model.config
    if context + tokens + 1 > cfg.max_position_embeddings:
        raise SambayError(f"context {context} + tokens {tokens} exceeds the model's "
                          f"{cfg.max_position_embeddings}-token context")
    state = model.new_state(batch, context + tokens + warmup + 1)
    if context:
        fill_state_synthetically(model, state, context)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1))
    kernels = native_status()
    for _ in range(warmup):
        ids = model(ids, state=state)[:, -1].argmax(-1, keepdim=True)
    bytes_step = decode_bytes_per_step(model, state, batch)  # grows by 1 position per step: negligible
    best_bandwidth = measure_bandwidth()
    # The machine is shared: its bandwidth drifts with the neighbours' load. So each step is held
    # against a probe read just before and just after it, and the median of those ratios is the
    # fraction of the roofline; the best bandwidth of the run gives a second, stricter figure.
    buf = torch.ones(PROBE_BYTES // 4, dtype=torch.float32)
    probes, times = [probe_bandwidth(buf)], []
    for _ in range(tokens):
        t = time.perf_counter()
        ids = model(ids, state=state)[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
        probes.append(probe_bandwidth(buf))
    best_bandwidth = max(best_bandwidth, measure_bandwidth(), *probes)
    beside = [(a + b) / 2 for a, b in zip(probes, probes[1:])]
    ratios = sorted(bytes_step["total"] / t / bw for t, bw in zip(times, beside))
    step = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    bandwidth = sorted(beside)[len(beside) // 2]
    achieved = bytes_step["total"] / step
    result = {
        "bench": "decode", "model": getattr(model, "source", model_name), "dtype": dtype,
        "quantize": quantize or "none", "batch": batch, "context": context,
        "tokens": tokens, "threads": torch.get_num_threads(), "kernels": kernels,
        "step_ms": round(step * 1e3, 2), "tokens_per_s": round(batch / step, 2),
        "bytes_per_step": bytes_step["total"], "bytes_breakdown": bytes_step,
        "bandwidth_gbs": round(bandwidth / 1e9, 2), "best_bandwidth_gbs": round(best_bandwidth / 1e9, 2),
        "achieved_gbs": round(achieved / 1e9, 2),
        "roofline_tokens_per_s": round(batch * bandwidth / bytes_step["total"], 2),
        "roofline_fraction": round(ratios[len(ratios) // 2], 3),
        "roofline_fraction_vs_best": round(achieved / best_bandwidth, 3),
        "context_filled": "synthetic (random K/V and SSM states)" if context else "none",
        "steps_ms": [round(t * 1e3, 3) for t in times], "beside_gbs": [round(b / 1e9, 3) for b in beside],
    }
    print(table([
        ("model", f"{result['model']}  [{dtype}{', int8 weights' if quantize else ''}]"),
        ("batch / context", f"{batch} / {context} tokens ({result['context_filled']})"),
        ("kernels / threads", f"{kernels} / {result['threads']}"),
        ("decode step", f"{result['step_ms']} ms (median of {tokens})"),
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
    return result
