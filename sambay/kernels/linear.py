"""Weight-only int8 quantization and the fast CPU linear layer used for decoding.

Decoding one token reads every weight once, so its speed is set by bytes read: int8 weights with
one float32 scale per output row halve the bytes of bf16. `PackedLinear` runs the native GEMV
(sambay.kernels) for the few rows of a decode step and a plain matmul for prefill.

    model = sambay.load_model(path, dtype=torch.bfloat16)
    quantize_model(model)            # every linear layer and the tied head -> int8
    save_quantized(model, "out/")    # loads back fast with sambay.load_model("out/")
"""

from __future__ import annotations

import functools
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

from sambay.kernels import native as kernels

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


QUANT_METHOD = "sambay-int8"


_scratch_buffers = threading.local()


def _scratch(dtype: torch.dtype, n: int) -> torch.Tensor:
    """A reused buffer of n elements (per thread and dtype, at most MATMUL_BLOCK_ELEMENTS) that prefill
    dequantizes weights into. Fresh memory costs its page faults at every call: a 20480 x 2560 int8
    layer took 175 ms to dequantize into new tensors, 22 ms into this one (the whole model: about
    9 s of each 512-token chunk's 21 s)."""
    bufs = _scratch_buffers.__dict__
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = None  # let the old one go first
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def progress(total: int, desc: str, unit: str):
    """A progress bar on stderr for loading work that can take a while (tqdm). It shows only on a
    terminal, and is cleared when done: the front-ends' "loaded in" line follows it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, disable=None, leave=False, dynamic_ncols=True, mininterval=0.5)


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


class PackedLinear(nn.Module):
    """y = x @ W.T (* scale) + b with W float32, bfloat16 or int8 (per-row scale).

    A few rows (decoding) go through the native GEMV and come out in float32, as packed models keep
    their activations (see `float32_activations`); more rows (prefill) use a matmul (`_matmul`)
    unless the GEMV is faster for them (`_gemv_for`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 persistent: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=persistent)
        self.register_buffer("weight_scale", scale, persistent=persistent)
        self.register_buffer("bias", bias, persistent=persistent)
        self.out_dtype = out_dtype or (weight.dtype if weight.is_floating_point() else torch.bfloat16)

    @classmethod
    def from_linear(cls, lin: nn.Linear, int8: bool) -> PackedLinear:
        w = lin.weight.detach()
        bias = None if lin.bias is None else lin.bias.detach()
        if int8:
            q, s = quantize_int8(w)
            return cls(q, bias, s, out_dtype=w.dtype)
        return cls(w, bias)

    def native(self) -> list[torch.Tensor] | None:
        """[weight, scale, bias] as the native decode blocks take a linear layer (empty tensors for
        none), or None if its bias is not float32."""
        buf = self._buffers  # directly: this runs for every layer at every decode step
        b, s = buf["bias"], buf["weight_scale"]
        if b is not None and b.dtype != torch.float32:
            return None
        return [buf["weight"], kernels._EMPTY if s is None else s, kernels._EMPTY if b is None else b]

    def dequantized(self, dtype: torch.dtype, r0: int = 0, r1: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Output rows r0:r1 (all by default; multiples of 4 for tiled weights) as plain dtype rows,
        written into `out` (that many elements) if given, else into a new tensor."""
        r1 = self.out_features if r1 is None else r1
        w, scale = self.weight, self.weight_scale
        if w.dtype == dtype and scale is None:
            return w[r0:r1]  # nothing to convert
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
        """int8 weights into the 4-row tiles the AVX2 GEMV streams (kernels.tile_int8), where the
        shape allows; state_dict still gives (and load_state_dict takes) the plain rows."""
        w = self.weight
        if w.dtype == torch.int8 and w.dim() == 2 and w.shape[0] % 4 == 0 and w.shape[1] % 64 == 0:
            self.weight = kernels.tile_int8(w)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination and destination[key].dim() == 4 and not keep_vars:  # keep_vars: as stored
            destination[key] = kernels.untile_int8(destination[key])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if self.weight is not None and self.weight.dim() == 4 and key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = kernels.tile_int8(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= GEMV_MAX_ROWS or self._gemv_for(x2):
            b = self.bias
            if b is None or b.dtype == torch.float32:  # the kernel adds a float32 bias itself
                y = kernels.gemv(x2, self.weight, self.weight_scale, bias=b)
            else:
                y = kernels.gemv(x2, self.weight, self.weight_scale) + b
        else:
            y = self._matmul(x2)
        return y.reshape(*lead, self.out_features)

    def _gemv_for(self, x2: torch.Tensor) -> bool:
        """Whether more than GEMV_MAX_ROWS rows (a prefill) are still faster in the native GEMV."""
        if x2.device.type != "cpu":
            return False
        if self.weight_scale is not None:  # int8: where the GEMV multiplies int8 activations
            return kernels.int8_rows_fast()
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
            w = self.dequantized(dt, r0, r1, out=_scratch(dt, (r1 - r0) * self.in_features))
            outs.append(F.linear(x2, w, bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        kind = "int8" if self.weight_scale is not None else str(self.weight.dtype).removeprefix("torch.")
        kind += ", 4-row tiles" if self.weight.dim() == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, {kind}"


def _linears(model: nn.Module, dt_proj: bool = False):
    """Every nn.Linear; Mamba's small dt_proj only when asked (it stays unquantized, see below)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (name == "dt_proj") == dt_proj:
                yield parent, name, child


def _pack_dt_proj(model: nn.Module) -> None:
    """dt_proj keeps its weights (0.2% of the model; dt feeds exp() so precision matters) and
    returns float32 with its bias added in float32, as the SSM expects."""
    for parent, name, lin in _linears(model, dt_proj=True):
        setattr(parent, name, PackedLinear(lin.weight.detach(), lin.bias.detach().float(),
                                           out_dtype=torch.float32))


@torch.no_grad()
def float32_activations(model) -> None:
    """In place: every parameter and buffer except the packed weights and the embedding becomes
    float32 (norms, conv taps, biases, D: well under 1% of the bytes). A packed model then computes
    in float32 between its GEMVs, as llama.cpp does, instead of converting its activations to and
    from bfloat16 around every one of them; only the K/V cache keeps the model's dtype."""
    keep = {id(model.model.embed_tokens.weight)}
    keep |= {id(m.weight) for m in model.modules() if isinstance(m, PackedLinear)}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) not in keep and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and id(b) not in keep and b.is_floating_point() and b.dtype != torch.float32:
                setattr(mod, name, b.float())


def int8_skeleton(model):
    """Turn a meta-device model into the int8 layout, so a quantized checkpoint can be loaded into it."""
    for parent, name, lin in _linears(model):
        N, K = lin.weight.shape
        bias = None if lin.bias is None else torch.empty(N, dtype=lin.bias.dtype, device="meta")
        setattr(parent, name, PackedLinear(torch.empty(N, K, dtype=torch.int8, device="meta"), bias,
                                           torch.empty(N, device="meta"), out_dtype=lin.weight.dtype))
    if model.lm_head is None:  # tied head: an int8 copy of the embedding
        emb = model.model.embed_tokens.weight
        model.lm_head = PackedLinear(torch.empty(emb.shape, dtype=torch.int8, device="meta"), None,
                                     torch.empty(emb.shape[0], device="meta"), out_dtype=emb.dtype)
    model.quantization = "int8"
    return model


@torch.no_grad()
def quantize_model(model, mode: str = "int8"):
    """In place: every nn.Linear and the output head (tied or not) become int8 PackedLinear layers."""
    if mode != "int8":
        from sambay.errors import SambayError

        raise SambayError(f"unknown quantization {mode!r}; supported: int8")
    linears = list(_linears(model))  # an untied lm_head is one of them
    emb = model.model.embed_tokens.weight if model.lm_head is None else None  # a tied head
    total = sum(lin.weight.numel() for _, _, lin in linears) + (emb.numel() if emb is not None else 0)
    with progress(total, "quantizing to int8", "weights") as bar:
        for parent, name, lin in linears:
            setattr(parent, name, PackedLinear.from_linear(lin, int8=True))
            bar.update(lin.weight.numel())
        if emb is not None:  # the tied head: an int8 copy of the embedding, which stays for lookups
            q, s = quantize_int8(emb.detach())
            model.lm_head = PackedLinear(q, None, s, out_dtype=emb.dtype)
            bar.update(emb.numel())
    _pack_dt_proj(model)
    float32_activations(model)
    model.quantization = mode
    return model


@torch.no_grad()
def pack_model(model):
    """In place, no quantization: route decode-time linears (and the tied head, sharing the
    embedding without a copy) through the native GEMV, activations in float32. Idempotent."""
    for parent, name, lin in _linears(model):
        setattr(parent, name, PackedLinear.from_linear(lin, int8=False))
    _pack_dt_proj(model)
    if model.lm_head is None:
        model.lm_head = PackedLinear(model.model.embed_tokens.weight, persistent=False)
    float32_activations(model)
    return model


def prepare_for_inference(model, quantize: str | None = None):
    """The one call front-ends make after loading: int8 if asked, otherwise pack the existing
    weights for the fast decode path. A checkpoint that is already int8 stays as it is.
    The native kernels are built (first use) or loaded here, and the weights brought into memory,
    so that no timed step pays for either."""
    kernels.native_status()
    if getattr(model, "quantization", None):
        _pack_dt_proj(model)
        float32_activations(model)
    elif quantize:
        quantize_model(model, quantize)
    else:
        pack_model(model)
    if kernels.tiles_int8():
        tile_int8_weights(model)
    prefault(model)
    return model


@torch.no_grad()
def tile_int8_weights(model) -> None:
    """In place: every int8 PackedLinear in 4-row tiles (PackedLinear.tile), the layout the AVX2
    int8 GEMV streams fastest (1.1-1.2x for the K = 2560 layers of Phi-4-mini-flash)."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.weight.dtype == torch.int8]
    with progress(sum(m.weight.numel() for m in layers), "int8 weights into tiles", "weights") as bar:
        for m in layers:
            m.tile()
            bar.update(m.weight.numel())


PAGE = 4096


@torch.no_grad()
def prefault(model) -> None:
    """Touch one byte of every page of every weight, as llama.cpp's mmap prefetch does.

    Weights loaded from safetensors are memory-mapped: each page is read from disk the first time
    it is used. Decoding touches all of a linear layer's pages in the first step, but only one
    embedding row per token, so without this every new token id would stall its step on a disk
    read (measured: 25-45 ms each, for a 1 GB embedding whose pages had left the page cache)."""
    seen, storages = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if t.device.type != "cpu" or storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        storages.append(storage)
    with progress(sum(s.nbytes() for s in storages), "reading weights into memory", "B") as bar:
        for storage in storages:
            flat = torch.empty(0, dtype=torch.uint8).set_(storage)
            flat[::PAGE].max()
            bar.update(storage.nbytes())
