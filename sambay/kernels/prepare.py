"""Preparing a model for inference, from outside: its linear layers become PackedLinear (int8 when
asked), its activations float32 between them, and it gets the native operations (NativeOps).

    model = sambay.load_model(path, dtype=torch.bfloat16)
    prepare_for_inference(model, quantize="int8")   # every linear layer and the tied head -> int8
    sambay.save_model(model, "out/")                # loads back int8 with sambay.load_model("out/")
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from sambay.errors import SambayError
from sambay.kernels import native
from sambay.kernels.backend import NativeOps
from sambay.kernels.linear import PackedLinear, Scratch
from sambay.ops import TORCH
from sambay.quant import quantize_int8
from sambay.quant.int4 import DEFAULT_FORMAT, INT8_LAYERS, Int4Format, fits_int4


def progress(total: int, desc: str, unit: str):
    """A progress bar on stderr for loading work that can take a while (tqdm). It shows only on a
    terminal, and is cleared when done: the front-ends' "loaded in" line follows it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, disable=None, leave=False, dynamic_ncols=True, mininterval=0.5)


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
    keep |= {id(m.weight_scale) for m in model.modules() if isinstance(m, PackedLinear) and m.int4}  # float16 groups
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
    return model


def int4_skeleton(model, fmt: Int4Format, int8_layers: list[str]):
    """The int4 twin of int8_skeleton: the layers named in int8_layers (a checkpoint's
    quantization_config) get the int8 layout, the others format fmt's 4-bit blocks."""
    int8_skeleton(model)
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear) and name not in int8_layers:
            n, k = m.out_features, m.in_features
            m.weight = torch.empty(n // 4, k // 32, 4, 16, dtype=torch.uint8, device="meta")
            m.weight_scale = torch.empty(n // 4, k // fmt.group, 8 if fmt.asym else 4, dtype=torch.float16,
                                         device="meta")
    return model


def _int4_layer(name: str, lin_weight: torch.Tensor, fmt: Int4Format, int8_layers) -> bool:
    return name.split(".")[-1] not in int8_layers and name not in int8_layers and fits_int4(lin_weight.shape, fmt)


@torch.no_grad()
def quantize_model(model, mode: str = "int8", fmt: Int4Format = DEFAULT_FORMAT,
                   int8_layers: tuple[str, ...] = INT8_LAYERS):
    """In place: every nn.Linear and the output head (tied or not) become int8 PackedLinear layers,
    or for mode "int4" 4-bit ones in format fmt, except the layers named (or whose last name part
    is) in int8_layers and those whose shape the 4-bit layout cannot hold, which stay int8."""
    if mode not in ("int8", "int4"):
        raise SambayError(f"unknown quantization {mode!r}; supported: int8, int4")
    linears = list(_linears(model))  # an untied lm_head is one of them
    emb = model.model.embed_tokens.weight if model.lm_head is None else None  # a tied head
    total = sum(lin.weight.numel() for _, _, lin in linears) + (emb.numel() if emb is not None else 0)
    with progress(total, f"quantizing to {mode}", "weights") as bar:
        names = {id(m): n for n, m in model.named_modules()}
        for parent, name, lin in linears:
            if mode == "int4" and _int4_layer(names[id(lin)], lin.weight, fmt, int8_layers):
                setattr(parent, name, PackedLinear.int4_from(lin.weight, None if lin.bias is None else lin.bias.detach(), fmt))
            else:
                setattr(parent, name, PackedLinear.from_linear(lin, int8=True))
            bar.update(lin.weight.numel())
        if emb is not None:  # the tied head: an int8 (or 4-bit) copy of the embedding, which stays for lookups
            if mode == "int4" and _int4_layer("lm_head", emb, fmt, int8_layers):
                model.lm_head = PackedLinear.int4_from(emb, None, fmt)
            else:
                q, s = quantize_int8(emb.detach())
                model.lm_head = PackedLinear(q, None, s, out_dtype=emb.dtype)
            bar.update(emb.numel())
    _pack_dt_proj(model)
    float32_activations(model)
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


def quantization_of(model) -> str | None:
    """The weight format of a model's linear layers: "int4" (some 4-bit), "int8", or None."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if any(m.int4 for m in packed):
        return "int4"
    return "int8" if any(m.weight_scale is not None for m in packed) else None


def int4_format_of(lin: PackedLinear) -> Int4Format:
    """The stored format of a 4-bit layer (its group size, and a min per group or not)."""
    return Int4Format(group=lin.in_features // lin.weight_scale.shape[1], asym=lin.weight_scale.shape[2] == 8)


def int8_layer_names(model) -> list[str]:
    """The int8 layers of a model that has 4-bit ones (its per-tensor policy, as saved)."""
    return [n for n, m in model.named_modules() if isinstance(m, PackedLinear) and not m.int4
            and m.weight.dtype == torch.int8]


def prepare_for_inference(model, quantize: str | None = None, level: str = "stack"):
    """The one call front-ends make after loading: int8 if asked, otherwise pack the existing
    weights for the fast decode path (a checkpoint that is already int8 stays as it is), and give
    the model the native operations at `level` (backend.LEVELS; PyTorch's where no kernels build).
    The native kernels are built (first use) or loaded here, and the weights brought into memory,
    so that no timed step pays for either."""
    lib = native.library()
    have = quantization_of(model)
    if have and quantize and quantize != have:
        raise SambayError(f"the checkpoint is already quantized to {have}; drop --quantize {quantize} "
                          f"(or use --quantize {have}), or load the unquantized checkpoint")
    if have:
        _pack_dt_proj(model)
        float32_activations(model)
    elif quantize:
        quantize_model(model, quantize)
    else:
        pack_model(model)
    if native.tiles_int8():
        tile_int8_weights(model)
    scratch = Scratch()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.scratch = scratch
    model.ops = NativeOps(lib, level) if lib is not None else TORCH
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
