"""What the benchmarks share: loading a model to measure, this machine's measured limits (read
bandwidth, matmul and int8-GEMV FLOP rates), the bytes one decode step reads, a synthetic decode
state, and the plain two-column table each benchmark prints before its JSON line.

A benchmark's figure means something only next to the limit it is bound by, measured in the same
run on the same (shared, drifting) machine: decode is bound by memory bandwidth, prefill by
arithmetic.
"""

from __future__ import annotations

import time

import torch

from sambay.kernels import gemv, stream_read, tile_int8, tiles_int8
from sambay.models.config import CROSS_ATTENTION, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA
from sambay.runtime.checkpoint import resolve_model
from sambay.runtime.load import load_for_inference

# A probe buffer far beyond any cache, yet small enough to read between two decode steps without
# slowing the run down much.
PROBE_BYTES = 512 * 2**20


def load(name: str, dtype: str | None, quantize: str | None, random_weights: bool = False, seed: int = 0):
    """The model `name` (folder, repo id or preset) through the one inference loader, without a
    tokenizer (benchmarks feed random token ids). A preset always gets random weights: speed and
    memory do not depend on the weights' values, so a benchmark never needs trained ones."""
    where = resolve_model(name)
    model, _ = load_for_inference(where, dtype=dtype, quantize=quantize,
                                  random_weights=random_weights or isinstance(where, str), seed=seed,
                                  with_tokenizer=False)
    return model


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns: what, then the figure."""
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# The machine's limits
# ---------------------------------------------------------------------------------------------


def probe_bandwidth(buf: torch.Tensor) -> float:
    """One read of `buf` with the streaming kernel: bytes/s right now."""
    t = time.perf_counter()
    stream_read(buf)
    return buf.numel() * 4 / (time.perf_counter() - t)


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` reads of a buffer far larger than cache."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    probe_bandwidth(x)
    return max(probe_bandwidth(x) for _ in range(repeats))


def best_seconds(fn, repeats: int) -> float:
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
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats)


def measure_int8_rows_flops(rows: int = 256, n: int = 4096, repeats: int = 3) -> float:
    """Multiply-add FLOP/s of the native int8 GEMV over many rows, as prefill runs int8 weights
    (kernels.int8_rows_fast): `rows` activation rows against an n x n int8 matrix, the best of `repeats`."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
    w = tile_int8(w) if tiles_int8() else w
    scale, x = torch.rand(n, generator=g), torch.randn(rows, n, generator=g)
    return 2 * rows * n * n / best_seconds(lambda: gemv(x, w, scale), repeats)


# ---------------------------------------------------------------------------------------------
# The decode state
# ---------------------------------------------------------------------------------------------


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
