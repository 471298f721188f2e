"""Optional native kernels (sambay/kernels/csrc), compiled on first use for this machine's CPU.

`gemv(x, w, scale)` computes x @ w.T * scale for a few activation rows, streaming the weights at
close to memory bandwidth. If no C++ compiler is available, or SAMBAY_NATIVE=0, the pure-PyTorch
reference `gemv_ref` is used instead (same results, slower); `native_status()` says which.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from sambay.kernels.loader import load_native
from sambay.quant.int4 import dequantize_int4

_lock = threading.Lock()
_module = None
_error: str | None = None


def tile_int8(w: torch.Tensor) -> torch.Tensor:
    """int8 weights (N, K) -> 4-row tiles (N / 4, K / 64, 4, 64): each tile's rows stored 64 values
    of each at a time, the order the AVX2 int8 GEMV streams them (csrc/gemv.cpp, gemv_q8)."""
    N, K = w.shape
    return w.view(N // 4, 4, K // 64, 64).transpose(1, 2).contiguous()


def untile_int8(w: torch.Tensor) -> torch.Tensor:
    """The plain (N, K) rows of weights in either layout (a copy for tiled ones)."""
    if w.dim() == 2:
        return w
    n4, kb, r, c = w.shape
    return w.transpose(1, 2).reshape(n4 * r, kb * c)


@functools.cache  # gemv asks at every call with a tiled weight; the build does not change
def tiles_int8() -> bool:
    """Whether this CPU's int8 GEMV streams weights in 4-row tiles (the AVX2 path; VNNI reads rows)."""
    return "int8-avx2" in fast_paths()


def gemv_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Reference: dequantize the weights and use torch's matmul. x (M, K) float32 -> (M, N)."""
    w = untile_int8(w)
    y = F.linear(x.float(), w.float())
    return y * scale.float() if scale is not None else y


def _load():
    """The native library, built on first use for this CPU (kernels/loader.py), or None."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            _module, _error = load_native()
        return _module


def native_status() -> str:
    _load()
    if _module is None:
        return f"pytorch ({_error})"
    isa = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability())
    return f"native ({isa})" if isa else "native (portable C++)"


def parallel_threads() -> int:
    """How many threads the native kernels' parallel loops run on now (torch.get_num_threads(),
    unless the build lacked OpenMP); 1 without native kernels."""
    mod = _load()
    return int(mod.parallel_threads()) if mod is not None else 1


def gemv_lowp_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Reference for the default (fast) path on this CPU: the activations rounded the way its
    kernel rounds them (int8 weights with an int8 path: int8 per block of 64 values; bf16 weights
    with bf16-dot: bf16), then exact math. Without such a path the activations stay float32."""
    x, w = x.float(), untile_int8(w)
    paths = fast_paths()
    if w.dtype == torch.int8 and x.shape[1] % 64 == 0 and any(p.startswith("int8") for p in paths):
        blocks = x.reshape(x.shape[0], -1, 64)
        xs = blocks.abs().amax(-1, keepdim=True) / 127
        xs = torch.where(xs > 0, xs, torch.ones_like(xs))
        x = (torch.round(blocks * (1 / xs)) * xs).reshape_as(x)  # the kernel multiplies by 1/scale
    elif w.dtype == torch.bfloat16 and "bf16-dot" in paths:
        x = x.bfloat16().float()
    y = F.linear(x.double(), w.double())
    return (y * scale.double() if scale is not None else y).float()


def fast_paths() -> list[str]:
    """Which low-precision dot-product paths this CPU build has (int8-vnni or int8-avx2, bf16-dot)."""
    mod = _load()
    return list(mod.fast_paths()) if mod is not None else []


@functools.cache
def int8_rows_fast() -> bool:
    """Whether int8 weights should meet many activation rows (prefill) in the native GEMV too, as
    llama.cpp's quantized matmuls do: where it multiplies int8 activations (int8-avx2, int8-vnni).
    On an AVX2 EPYC, a 20480 x 2560 int8 layer took 0.56-0.60 ms per row in it at 16 to 256 rows,
    against 0.79 (512 rows) to 4.1 ms (17 rows) for dequantizing to float32 and a matmul."""
    return any(p.startswith("int8-") for p in fast_paths())


EMPTY = torch.empty(0)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
         exact: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T * scale + bias (bias float32). Where the CPU has them (see fast_paths), int8 weights
    meet activations rounded to int8 per 64-value block, bf16 weights meet bf16 activations;
    exact=True keeps x in float32. gemv_lowp_ref and gemv_ref are the references."""
    mod = _module or _load()
    if w.dim() == 4 and (mod is None or exact or not tiles_int8()):  # tiles: the int8-activation path only
        w = untile_int8(w)
    if mod is None or x.device.type != "cpu" or torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad):
        y = gemv_ref(x, w, scale)
        return y if bias is None else y + bias
    return mod.gemv(x.float(), w, EMPTY if scale is None else scale, int(exact),
                    EMPTY if bias is None else bias)


def gemv_q4_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Reference for gemv_q4: the activations rounded to int8 per block of 32 as the kernel rounds
    them, then exact (float64) math with the dequantized weights (sambay.quant.int4)."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    xs = blocks.abs().amax(-1, keepdim=True) / 127
    xs = torch.where(xs > 0, xs, torch.ones_like(xs))
    xq = (torch.round(blocks * (1 / xs)) * xs).reshape(x.shape)
    return F.linear(xq.double(), dequantize_int4(packed, scales, torch.float64)).float()


def q4_paths() -> list[str]:
    """The 4-bit GEMV's paths in this build, fastest first (vnni, avx2, scalar); [] without kernels."""
    mod = _load()
    return list(mod.q4_paths()) if mod is not None else []


def gemv_q4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
            path: str = "") -> torch.Tensor:
    """x @ W.T + bias for 4-bit W (sambay.quant.int4's layout), activations rounded to int8 per 32
    values; path: one of q4_paths() (tests), by default the fastest. gemv_q4_ref is the reference
    (and what runs without kernels or under autograd)."""
    mod = _module or _load()
    if mod is None or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
        y = F.linear(x.float(), dequantize_int4(packed, scales))
        return y if bias is None else y + bias
    return mod.gemv_q4(x.float(), packed, scales, EMPTY if bias is None else bias, path)


def stream_read(buf: torch.Tensor) -> float:
    """Sum a large float32 buffer with the native streaming loop (torch.sum without kernels)."""
    mod = _load()
    return mod.stream_read(buf) if mod is not None else float(buf.sum())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
    """Native one-query attention, or None when unavailable (the caller then uses PyTorch).

    q (B, G, Hk, g, dk); k (B, G, Hk, S, dk); v (B, Hk, S, dv); valid (B, S) -> (B, G, Hk, g, dv).
    Query group i attends with keys k[:, i]; all groups share v, which is read once.
    """
    mod = _load()
    if mod is None or q.device.type != "cpu" or torch.is_grad_enabled():
        return None
    return mod.decode_attention(q.float(), k, v, valid)


def decode_diff_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, lam: float):
    """Native differential one-query attention, or None when unavailable: q (B, 2, Hk, g, dk) and k
    as decode_attention takes them, v (B, Hk, S, dv) or in column blocks (B, Hk, nb, S, dv / nb);
    returns (B, 1, Hk, g, dv), group 0's output - lam * group 1's."""
    mod = _load()
    if mod is None or q.device.type != "cpu" or torch.is_grad_enabled():
        return None
    return mod.decode_diff_attention(q.float(), k, v, valid, lam)


def ssm_step(x, dt, A, Bm, Cm, D, state: torch.Tensor):
    """Native Mamba decode step (ops.selective_state_step is its reference), or None when unavailable."""
    mod = _load()
    if (mod is None or state.device.type != "cpu" or not state.is_contiguous() or torch.is_grad_enabled()
            or any(t.dtype != torch.float32 for t in (x, dt, A, Bm, Cm, D, state))):
        return None
    return mod.ssm_step(x, dt, A, Bm, Cm, D, state)


def library():
    """The native extension module, or None where it cannot be built or is disabled (SAMBAY_NATIVE=0)."""
    return _module or _load()
