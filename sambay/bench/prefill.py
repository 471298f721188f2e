"""`sambay bench prefill`: prefill speed for several prompt lengths, held against this machine's
measured FLOP rate.

Prefill is compute-bound, so each length's FLOP rate (counted from the linear layers actually
called) is compared with what the multiply prefill uses can do on this machine: the native int8
GEMV over many rows for int8 weights, else a large matmul in the dtype prefill multiplies in.
`time_prefill` is also what `bench memory` times.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from sambay.bench.common import load, measure_int8_rows_flops, measure_matmul_flops, table
from sambay.errors import SambayError
from sambay.kernels import PackedLinear, fast_cpu_matmul, int8_rows_fast


@contextlib.contextmanager
def counting_linear_flops(model, total: list):
    """Adds to total[0] the multiply-add FLOPs of every linear layer called as a module inside the
    block. Right where a model skips work (SambaY's prefill runs its
    cross-decoder only where logits are kept), unlike 2 x parameters x tokens. Mamba's dt_proj (0.2 %
    of the weights) is applied through its weight, so it is not counted."""
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


def _int8_weights(model) -> bool:
    """Whether the linear layers hold int8 weights (quantized now, or a quantized checkpoint)."""
    return any(isinstance(m, PackedLinear) and m.weight.dtype == torch.int8 for m in model.modules())


def matmul_peak(model, dtype: str) -> tuple[str, float]:
    """(what prefill multiplies in, its measured FLOP/s): as PackedLinear.forward chooses."""
    if _int8_weights(model) and int8_rows_fast():
        return "int8", measure_int8_rows_flops()
    wanted = getattr(torch, dtype)  # PackedLinear._matmul: float32 where the dtype has no fast matmul
    compute = str(wanted if fast_cpu_matmul(wanted) else torch.float32).removeprefix("torch.")
    return compute, measure_matmul_flops(dtype=getattr(torch, compute))


@torch.no_grad()  # the engine's mode, so the same code path is timed
def bench_prefill(model_name: str, *, lengths: list[int], dtype: str = "bfloat16", quantize: str | None = None,
                  random_weights: bool = False, chunk: int = 512) -> dict:
    """Time a batch-1 prefill of each of `lengths` random tokens, `chunk` tokens per call; print the
    table and the JSON line, and return the JSON object."""
    model = load(model_name, dtype, quantize, random_weights)
    cfg = model.config
    if any(n < 1 or n > cfg.max_position_embeddings for n in lengths):
        raise SambayError(f"--lengths must be between 1 and {cfg.max_position_embeddings}")
    compute, flops_peak = matmul_peak(model, dtype)
    rows = []
    for n in lengths:
        count = [0]
        sec, state = time_prefill(model, n, chunk, flops=count)
        flops = count[0]  # the linear layers'; attention adds a little on top
        rows.append({"tokens": n, "seconds": round(sec, 3), "tokens_per_s": round(n / sec, 1),
                     "gflops": round(flops / sec / 1e9, 1), "state_bytes": state.nbytes()})
        print(f"prefill {n:6d} tokens: {sec:8.2f} s  {n / sec:8.1f} tok/s  {flops / sec / 1e9:7.1f} GFLOP/s  "
              f"state {state.nbytes() / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
    source = getattr(model, "source", model_name)
    peak = (f"{flops_peak / 1e9:.1f} GFLOP/s ({'the int8 GEMV' if compute == 'int8' else compute + ' matmul'}, "
            f"as prefill computes)")
    print(table([("model", source), ("matmul peak (measured)", peak)]
                + [(f"{r['tokens']} tokens", f"{r['seconds']} s, {r['tokens_per_s']} tok/s, {r['gflops']} GFLOP/s "
                                             f"({100 * r['gflops'] * 1e9 / flops_peak:.0f}% of matmul peak)")
                   for r in rows]))
    result = {"bench": "prefill", "model": source, "dtype": dtype, "quantize": quantize or "none",
              "chunk": chunk, "matmul_dtype": compute, "matmul_peak_gflops": round(flops_peak / 1e9, 1),
              "results": rows}
    print(json.dumps(result))
    return result
