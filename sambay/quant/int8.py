"""Symmetric int8 weights with one float32 scale per output row: w ~= q * scale[:, None]."""

from __future__ import annotations

import torch

# Written into a quantized checkpoint's config.json (quantization_config.quant_method).
QUANT_METHOD = "sambay-int8"


def quantize_int8(w: torch.Tensor, rows_per_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w ~= q * scale[:, None]. Chunked to avoid a float32 copy."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        block = w[r0:r0 + rows_per_chunk].to(torch.float32, copy=True)  # a copy: divided in place
        s = block.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[r0:r0 + rows_per_chunk] = block.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[r0:r0 + rows_per_chunk] = s
    return q, scale




def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weights an int8 (q, scale) pair stands for."""
    return (q.to(dtype) * scale.to(dtype)[:, None]).to(dtype)
