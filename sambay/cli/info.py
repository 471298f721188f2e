"""`sambay info` (what a model is, without loading its weights) and `sambay quantize`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from sambay.errors import SambayError
from sambay.kernels import native as kernels
from sambay.kernels.prepare import quantization_of, quantize_model
from sambay.quant.int4 import DEFAULT_FORMAT, Int4Format
from sambay.models import preset
from sambay.models.config import (ATTENTION, CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA,
                                  ModelConfig, Phi3Config, load_config)
from sambay.runtime.checkpoint import load_model, resolve_model, save_model

ROLE = {
    MAMBA: "Mamba-1 (selective SSM)",
    SWA: "sliding-window attention",
    MEMORY_MAMBA: "Mamba-1, emits the shared memory",
    KV_ATTENTION: "full attention, emits the shared K/V",
    GMU: "GMU (gated memory unit)",
    CROSS_ATTENTION: "cross-attention over the shared K/V",
    ATTENTION: "self-attention with RoPE",
}


def model_config(name: str | None) -> tuple[ModelConfig, str]:
    where = resolve_model(name)
    if isinstance(where, str):
        return preset(where), f"preset {where}"
    return load_config(where / "config.json"), str(where)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def describe(cfg: ModelConfig, source: str, kv_bytes: int = 2) -> dict:
    kinds = cfg.layer_kinds
    rows = []
    for i, kind in enumerate(kinds):
        role = ROLE[kind]
        if kind in (SWA, ATTENTION):
            window = cfg.window_of(i)
            role += f" (window {window})" if window else "" if kind == ATTENTION else " (no window: full)"
        if kind in (SWA, KV_ATTENTION, CROSS_ATTENTION):
            role += ", differential" if cfg.differential_attention else ""
        rows.append(role)
    return {
        "source": source,
        "layout": cfg.layout,
        "layers": rows,
        "parameters": cfg.num_parameters(),
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "heads": f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value, head_dim {cfg.head_dim}",
        "state_bytes_per_token": cfg.state_bytes_per_token(kv_bytes),
        "state_bytes_fixed": cfg.state_bytes_fixed(1, kv_bytes),
        "max_position_embeddings": cfg.max_position_embeddings,
    }


def run_info(args: argparse.Namespace) -> int:
    cfg, source = model_config(args.model or args.preset)
    kv_bytes = 4 if cfg.torch_dtype == "float32" else 2
    info = describe(cfg, source, kv_bytes)
    if args.json:
        print(json.dumps(info))
        return 0
    baseline = isinstance(cfg, Phi3Config)
    print(f"model       {info['source']}")
    legend = ("T Transformer layer" if baseline else
              "M Mamba, S sliding-window attn, A full attn | G GMU, X cross-attn")
    print(f"layout      {info['layout']}   ({legend})")
    print(f"parameters  {info['parameters']:,}")
    print(f"hidden      {cfg.hidden_size}, intermediate {cfg.intermediate_size}, heads {info['heads']}")
    dt = cfg.torch_dtype
    if baseline:
        print(f"rope        {cfg.rotary_dim} of {cfg.head_dim} dims per head, theta {cfg.rope_theta:g}"
              f"{', LongRoPE' if cfg.longrope else ''}")
        print(f"state       {info['state_bytes_per_token']:,} bytes per token of context ({dt} K/V of "
              f"all {cfg.num_hidden_layers} layers)")
    else:
        print(f"mamba       d_inner {cfg.d_inner}, d_state {cfg.mamba_d_state}, d_conv {cfg.mamba_d_conv}, "
              f"dt_rank {cfg.dt_rank}")
        print(f"state       {info['state_bytes_per_token']:,} bytes per token of context ({dt} K/V of one "
              f"layer) + {_gib(info['state_bytes_fixed'])} fixed per sequence")
    print(f"context     up to {cfg.max_position_embeddings:,} tokens")
    if args.kernels:
        print(f"kernels     {kernels.native_status()} on {kernels.parallel_threads()} thread(s); low-precision paths: "
              f"{', '.join(kernels.fast_paths()) or 'none (exact float32 activations)'}")
    print("layers:")
    for i, role in enumerate(info["layers"]):
        part = "decoder      " if baseline else "self-decoder " if i <= cfg.kv_layer else "cross-decoder"
        print(f"  {i:3d}  {part}  {role}")
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.description = ("Show a model's layer layout, parameter count and decode-state bytes per token, "
                     "reading only its config.json.")
    p.add_argument("--model", help="model folder, Hugging Face repo id, or preset name "
                                   "(default: the embedded default model)")
    p.add_argument("--preset", help="same as --model with a preset name, e.g. phi4-mini-flash")
    p.add_argument("--kernels", action="store_true",
                   help="also say which native decode kernels this CPU uses (compiles them on first use)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_info)


def add_quantize(q: argparse.ArgumentParser) -> None:
    q.description = ("Quantize every linear layer and the output head to int8 (one scale per output row) "
                     "or int4 (4-bit groups; the layers of the per-tensor policy, e.g. the head, at int8) "
                     "and save a checkpoint that loads without re-quantizing.")
    q.add_argument("--quantize", choices=["int8", "int4"], default="int8", help="the weight format (default int8)")
    q.add_argument("--int4-format", default=None,
                   help="int4 only: rtn-g32, sym-g32, asym-g32, asym-g64 ... (default: the measured best)")
    q.add_argument("--model", help="model folder or Hugging Face repo id (default: embedded model)")
    q.add_argument("--out", required=True, help="folder to write")
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the parts that stay unquantized (norms, embedding, Mamba SSM)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    where = resolve_model(args.model)
    if isinstance(where, str):
        raise SambayError(f"{where!r} is a preset without trained weights; quantize a model folder")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SambayError(f"{out} exists and is not empty; choose another --out or add --overwrite")
    t = time.perf_counter()
    print(f"loading {where} ...", file=sys.stderr, flush=True)
    model = load_model(where, dtype=getattr(torch, args.dtype))
    if quantization_of(model):
        raise SambayError(f"{where} is already quantized ({quantization_of(model)})")
    print(f"quantizing every linear layer and the head to {args.quantize} ...", file=sys.stderr, flush=True)
    if args.int4_format and args.quantize != "int4":
        raise SambayError("--int4-format needs --quantize int4")
    quantize_model(model, args.quantize, Int4Format.parse(args.int4_format) if args.int4_format else DEFAULT_FORMAT)
    save_model(model, out)
    for f in where.iterdir():  # tokenizer and other side files travel with the weights
        if f.is_file() and (f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens",
                                                "added_tokens", "chat_template"))):
            shutil.copy2(f, out / f.name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s; load it with "
          f"--model {out}", file=sys.stderr)
    return 0
