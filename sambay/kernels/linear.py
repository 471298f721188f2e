"""The fast CPU linear layer: `PackedLinear`, which the prepared models use instead of nn.Linear.

Decoding one token reads every weight once, so its speed is set by bytes read: int8 weights with
one float32 scale per output row halve the bytes of bf16. `PackedLinear` runs the native GEMV for
the few rows of a decode step (and, where it multiplies int8 activations, for prefill rows too) and
a plain matmul otherwise. sambay.kernels.prepare swaps it in.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sambay.kernels import native
from sambay.quant import quantize_int8
from sambay.quant.int4 import DEFAULT_FORMAT, Int4Format, dequantize_int4, quantize_int4

# Decode steps and small batches go through the GEMV kernel; more rows (prefill) use matmul.
GEMV_MAX_ROWS = 16
# bf16 weights without a fast bf16 matmul: up to this many rows, the GEMV (float32 activations) beats
# converting the weights to float32 for a matmul (a 20480 x 2560 layer on an AVX2 EPYC, ms per row:
# 1.8 against 2.9 at 32 rows, 1.8 against 1.7 at 64).
GEMV_CONVERT_MAX_ROWS = 48
# A prefill matmul dequantizes at most this many weights at a time (a float32 block of 256 MB).
MATMUL_BLOCK_ELEMENTS = 64 * 2**20


@functools.cache
def fast_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether PyTorch multiplies `dtype` matrices fast on this CPU. Half types need oneDNN's
    native support (AVX512-BF16 / AMX or AVX512-FP16); without it they took a slow path here
    (AVX2 EPYC, torch 2.13: a bf16 linear of 512 x 2560 x 10240 at 21 GFLOP/s, float32 at 152, and
    converting the weights to float32 first at 127), so prefill then computes in float32."""
    if dtype == torch.float32:
        return True
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, check)()) if check else False
    except (AttributeError, RuntimeError):
        return False


class Scratch:
    """A reused buffer (per dtype, at most MATMUL_BLOCK_ELEMENTS) that prefill dequantizes weights
    into, shared by one model's PackedLinear layers and freed with them. Fresh memory costs its page
    faults at every call: a 20480 x 2560 int8 layer took 8x longer to dequantize into new tensors
    than into this one."""

    def __init__(self):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < n:
            self.buffers.pop(dtype, None)  # let the old one go first
            buf = self.buffers[dtype] = torch.empty(n, dtype=dtype)
        return buf[:n]


class PackedLinear(nn.Module):
    """y = x @ W.T (* scale) + b with W float32, bfloat16, int8 (per-row scale) or 4-bit (uint8
    blocks with float16 group scales, sambay.quant.int4's layout: `int4` is True).

    A few rows (decoding) go through the native GEMV and come out in float32, as packed models keep
    their activations (see `float32_activations`); more rows (prefill) use a matmul (`_matmul`)
    unless the GEMV is faster for them (`_gemv_for`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 persistent: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape[:2]
        if weight.dtype == torch.uint8:  # 4-bit blocks (N / 4, K / 32, 4, 16)
            self.out_features, self.in_features = weight.shape[0] * 4, weight.shape[1] * 32
        self.register_buffer("weight", weight, persistent=persistent)
        self.register_buffer("weight_scale", scale, persistent=persistent)
        self.register_buffer("bias", bias, persistent=persistent)
        self.out_dtype = out_dtype or (weight.dtype if weight.is_floating_point() else torch.bfloat16)
        # Where prefill dequantizes blocks of weights; shared by a model's layers (prepare_for_inference).
        self.scratch: Scratch | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, int8: bool) -> PackedLinear:
        w = lin.weight.detach()
        bias = None if lin.bias is None else lin.bias.detach()
        if int8:
            q, s = quantize_int8(w)
            return cls(q, bias, s, out_dtype=w.dtype)
        return cls(w, bias)

    @classmethod
    def int4_from(cls, w: torch.Tensor, bias: torch.Tensor | None, fmt: Int4Format = DEFAULT_FORMAT,
                  out_dtype: torch.dtype | None = None) -> PackedLinear:
        """A 4-bit layer of float weights w (N, K) in format fmt; out_dtype as the float weights'."""
        packed, scales = quantize_int4(w.detach(), fmt)
        lin = cls(packed, bias, scales, out_dtype=out_dtype or w.dtype)
        lin.out_features, lin.in_features = w.shape
        return lin

    @property
    def int4(self) -> bool:
        return self.weight.dtype == torch.uint8

    def dequantized(self, dtype: torch.dtype, r0: int = 0, r1: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Output rows r0:r1 (all by default; multiples of 4 for tiled weights) as plain dtype rows,
        written into `out` (that many elements) if given, else into a new tensor."""
        r1 = self.out_features if r1 is None else r1
        w, scale = self.weight, self.weight_scale
        if w.dtype == dtype and scale is None:
            return w[r0:r1]  # nothing to convert
        if w.dtype == torch.uint8:  # 4-bit blocks of 4 rows
            rows = dequantize_int4(w[r0 // 4:r1 // 4], scale[r0 // 4:r1 // 4], dtype)
            return rows if out is None else out.view_as(rows).copy_(rows)
        if out is None:
            out = torch.empty((r1 - r0) * self.in_features, dtype=dtype, device=w.device)
        rows = out.view(r1 - r0, self.in_features)
        if w.dim() == 4:  # untile while converting: one pass
            n4, kb, r, c = w.shape
            rows.view((r1 - r0) // 4, r, kb, c).copy_(w[r0 // 4:r1 // 4].transpose(1, 2))
        else:
            rows.copy_(w[r0:r1])
        return rows if scale is None else rows.mul_(scale[r0:r1].to(dtype)[:, None])

    def tile(self) -> None:
        """int8 weights into the 4-row tiles the AVX2 GEMV streams (native.tile_int8), where the
        shape allows; state_dict still gives (and load_state_dict takes) the plain rows."""
        w = self.weight
        if w.dtype == torch.int8 and w.dim() == 2 and w.shape[0] % 4 == 0 and w.shape[1] % 64 == 0:
            self.weight = native.tile_int8(w)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination and destination[key].dim() == 4 and destination[key].dtype == torch.int8 and not keep_vars:  # keep_vars: as stored
            destination[key] = native.untile_int8(destination[key])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if self.weight is not None and self.weight.dim() == 4 and self.weight.dtype == torch.int8 and key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = native.tile_int8(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.int4 and x2.device.type == "cpu":  # every row count: the kernel reads each weight once per call
            b = self.bias
            y = native.gemv_q4(x2, self.weight, self.weight_scale, b if b is None or b.dtype == torch.float32 else None)
            y = y if b is None or b.dtype == torch.float32 else y + b
        elif x2.shape[0] <= GEMV_MAX_ROWS or self._gemv_for(x2):
            b = self.bias
            if b is None or b.dtype == torch.float32:  # the kernel adds a float32 bias itself
                y = native.gemv(x2, self.weight, self.weight_scale, bias=b)
            else:
                y = native.gemv(x2, self.weight, self.weight_scale) + b
        else:
            y = self._matmul(x2)
        return y.reshape(*lead, self.out_features)

    def _gemv_for(self, x2: torch.Tensor) -> bool:
        """Whether more than GEMV_MAX_ROWS rows (a prefill) are still faster in the native GEMV."""
        if x2.device.type != "cpu":
            return False
        if self.weight_scale is not None:  # int8: where the GEMV multiplies int8 activations
            return native.int8_rows_fast()
        # bf16 weights that the matmul would first convert to float32 (no fast bf16 matmul here)
        return (x2.shape[0] <= GEMV_CONVERT_MAX_ROWS and self.weight.dtype != torch.float32
                and not fast_cpu_matmul(self.weight.dtype))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): dequantize, then one matmul, in out_dtype where this CPU multiplies
        it fast, otherwise in float32 (then so is the result). Large weights (a tied head) go in
        blocks of rows, so that no full float32 copy of them is made."""
        dt = self.out_dtype
        if x2.device.type == "cpu" and not fast_cpu_matmul(dt):
            dt = torch.float32
        x2 = x2.to(dt)
        step = max(4, MATMUL_BLOCK_ELEMENTS // self.in_features // 4 * 4)  # a multiple of 4 (tiles)
        outs = []
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            bias = None if self.bias is None else self.bias[r0:r1].to(dt)
            n = (r1 - r0) * self.in_features
            w = self.dequantized(dt, r0, r1, out=self.scratch.get(dt, n) if self.scratch is not None else None)
            outs.append(F.linear(x2, w, bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        kind = "int8" if self.weight_scale is not None else str(self.weight.dtype).removeprefix("torch.")
        if self.int4:
            kind = f"int4 g{self.in_features // self.weight_scale.shape[1]}" + (
                ", zero-point" if self.weight_scale.shape[2] == 8 else "")
        kind += ", 4-row tiles" if self.weight.dim() == 4 and not self.int4 else ""
        return f"in={self.in_features}, out={self.out_features}, {kind}"
