"""Group-wise 4-bit weights, as plain tensor math: w ~= u * scale + min per group of G values.

u is an unsigned 4-bit code (0..15) per weight; each group of G consecutive weights of a row has a
float16 scale and, in the zero-point ("asym") formats, a float16 min. The symmetric formats have no
stored min: their codes stand for u - 8, i.e. min = -8 * scale (llama.cpp's Q4_0 convention), so
one kernel serves both (csrc/gemv_q4.cpp).

How the scale is found (`method`):
- "rtn": round-to-nearest absmax, scale = max|w| / 7 (the baseline every format is measured against);
- "search": per group, the scale (and for asym the range) is shrunk by a few candidate factors and
  the one with the smallest squared error kept, an error-minimizing clip in the spirit of
  llama.cpp's make_qx_quants and AWQ's clip search.

Storage (also the kernel's layout, so a checkpoint loads without conversion): rows in blocks of 4,
each block's groups of 32 stored together,
    packed (N / 4, K / 32, 4, 16) uint8: byte j of row r's 32 values = u[j] | u[j + 16] << 4,
    scales (N / 4, K / G, 4) float16, or (N / 4, K / G, 8): 4 scales then 4 mins (asym),
so one 64-byte read holds the same 32 columns of 4 rows and unpacking is an and and a shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sambay.errors import SambayError

# Written into a quantized checkpoint's config.json (quantization_config.quant_method).
QUANT_METHOD_INT4 = "sambay-int4"
ROWS = 4     # rows interleaved per block
BLOCK = 32   # columns per stored block (and per int8 activation block in the kernel)


@dataclass(frozen=True)
class Int4Format:
    """One 4-bit weight format: group size, symmetric or zero-point, how the scales are chosen."""

    group: int = 32
    asym: bool = False
    method: str = "search"

    @property
    def name(self) -> str:
        return f"{'rtn' if self.method == 'rtn' else ('asym' if self.asym else 'sym')}-g{self.group}"

    @classmethod
    def parse(cls, name: str) -> Int4Format:
        """'rtn-g32', 'sym-g64', 'asym-g32' ... -> the format (the names `name` gives)."""
        try:
            kind, g = name.split("-g")
            group = int(g)
        except ValueError:
            raise SambayError(f"unknown int4 format {name!r}; use e.g. sym-g32, asym-g32 or rtn-g32") from None
        if kind not in ("rtn", "sym", "asym") or group % BLOCK or group <= 0:
            raise SambayError(f"unknown int4 format {name!r}; kinds rtn, sym, asym; group a multiple of 32")
        return cls(group=group, asym=kind == "asym", method="rtn" if kind == "rtn" else "search")


# The candidate shrink factors of the scale search (1.0 = plain absmax / min-max).
SHRINK = torch.tensor([1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70])
# The format `--quantize int4` means, chosen by `sambay eval quant` (docs/benchmarks.md): the
# searched symmetric scales with groups of 32 had the lowest KL at 4.5 bits per weight.
DEFAULT_FORMAT = Int4Format(group=32, asym=False)
# The layers `--quantize int4` keeps at int8 (by module name or its last part), chosen likewise.
INT8_LAYERS = ("lm_head",)


def fits_int4(shape: torch.Size | tuple, fmt: Int4Format) -> bool:
    """Whether a (N, K) weight can be stored in the layout (N a multiple of 4, K of the group)."""
    n, k = shape
    return n % ROWS == 0 and k % fmt.group == 0 and k % BLOCK == 0


def _codes(g: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return torch.round((g - mn) / scale).clamp_(0, 15)


def _candidates(g: torch.Tensor, fmt: Int4Format, shrink: torch.Tensor):
    """(scale, min) for each shrink factor: shapes (S, rows, groups, 1)."""
    f = shrink.view(-1, 1, 1, 1)
    if fmt.asym:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * f
        scale = (2 * half / 15).clamp(min=1e-10)
        return scale, mid - half
    scale = (g.abs().amax(-1, keepdim=True) / 7 * f).clamp(min=1e-10)
    return scale, -8 * scale


def quantize_int4_rows(w: torch.Tensor, fmt: Int4Format):
    """(N, K) float -> u (N, K) uint8 codes, scale (N, K / G) float16, min (N, K / G) float16.

    Scales and mins are rounded to float16 before the codes are chosen, so the codes fit the
    values the kernel multiplies by."""
    n, k = w.shape
    g = w.float().reshape(n, k // fmt.group, fmt.group)
    shrink = SHRINK[:1] if fmt.method == "rtn" else SHRINK
    scale, mn = _candidates(g, fmt, shrink)
    scale, mn = scale.half().float(), (mn.half().float() if fmt.asym else -8 * scale.half().float())
    if len(shrink) > 1:
        err = torch.stack([((_codes(g, s, m) * s + m - g) ** 2).sum(-1) for s, m in zip(scale, mn)])
        best = err.argmin(0).unsqueeze(-1)  # (rows, groups, 1)
        scale = torch.gather(scale.squeeze(-1).permute(1, 2, 0), 2, best)
        mn = torch.gather(mn.squeeze(-1).permute(1, 2, 0), 2, best)
    else:
        scale, mn = scale[0], mn[0]
    u = _codes(g, scale, mn).to(torch.uint8).reshape(n, k)
    return u, scale.squeeze(-1).half(), mn.squeeze(-1).half()


def pack_int4(u: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, asym: bool):
    """Codes and per-group scales (quantize_int4_rows) -> the stored layout (module docstring)."""
    n, k = u.shape
    b = u.reshape(n // ROWS, ROWS, k // BLOCK, 2, 16).transpose(1, 2)  # (N/4, K/32, 4, 2, 16)
    packed = (b[..., 0, :] | (b[..., 1, :] << 4)).contiguous()
    s = scale.reshape(n // ROWS, ROWS, -1).transpose(1, 2)
    if asym:
        s = torch.cat([s, mn.reshape(n // ROWS, ROWS, -1).transpose(1, 2)], dim=-1)
    return packed, s.contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor):
    """The stored layout -> codes u (N, K) uint8, scale and min (N, K / G) float32."""
    check_int4(packed, scales)
    nb, kb, _, _ = packed.shape
    n, k = nb * ROWS, kb * BLOCK
    u = torch.stack([packed & 15, packed >> 4], dim=3)  # (N/4, K/32, 4, 2, 16)
    u = u.transpose(1, 2).reshape(n, k)
    s = scales.float()
    scale = s[..., :ROWS].transpose(1, 2).reshape(n, -1)
    mn = s[..., ROWS:].transpose(1, 2).reshape(n, -1) if s.shape[-1] == 2 * ROWS else -8 * scale
    return u, scale, mn


def check_int4(packed: torch.Tensor, scales: torch.Tensor) -> None:
    """A SambayError unless (packed, scales) are a well-formed stored pair (a corrupt checkpoint)."""
    ok = (packed.dtype == torch.uint8 and packed.dim() == 4 and tuple(packed.shape[2:]) == (ROWS, 16)
          and scales is not None and scales.dtype == torch.float16 and scales.dim() == 3
          and scales.shape[0] == packed.shape[0] and scales.shape[2] in (ROWS, 2 * ROWS)
          and scales.shape[1] > 0 and (packed.shape[1] * BLOCK) % scales.shape[1] == 0
          and (packed.shape[1] * BLOCK // scales.shape[1]) % BLOCK == 0)
    if not ok:
        raise SambayError(f"corrupt int4 tensor: packed {tuple(packed.shape)} {packed.dtype}, scales "
                          f"{None if scales is None else (tuple(scales.shape), scales.dtype)}; re-run sambay quantize")


def quantize_int4(w: torch.Tensor, fmt: Int4Format = DEFAULT_FORMAT, rows_per_chunk: int = 256):
    """(N, K) float -> (packed, scales) in the stored layout. Chunked by rows: the scale search holds
    a few float32 copies of a chunk per candidate, which for whole large layers ran out of memory."""
    parts = [pack_int4(*quantize_int4_rows(w[r:r + rows_per_chunk], fmt), fmt.asym)
             for r in range(0, w.shape[0], rows_per_chunk)]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weights a stored (packed, scales) pair stands for: u * scale + min per group."""
    u, scale, mn = unpack_int4(packed, scales)
    n, k = u.shape
    g = k // scale.shape[1]
    w = u.float().view(n, -1, g) * scale[..., None] + mn[..., None]
    return w.reshape(n, k).to(dtype)


def int4_group(packed: torch.Tensor, scales: torch.Tensor) -> int:
    return packed.shape[1] * BLOCK // scales.shape[1]
