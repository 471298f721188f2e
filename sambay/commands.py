"""`sambay info`: what a model is, without loading its weights."""

from __future__ import annotations

import argparse
import json

from .config import (CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA, SambaYConfig,
                     preset)

ROLE = {
    MAMBA: "Mamba-1 (selective SSM)",
    SWA: "sliding-window attention",
    MEMORY_MAMBA: "Mamba-1, emits the shared memory",
    KV_ATTENTION: "full attention, emits the shared K/V",
    GMU: "GMU (gated memory unit)",
    CROSS_ATTENTION: "cross-attention over the shared K/V",
}


def model_config(name: str | None) -> tuple[SambaYConfig, str]:
    from .checkpoint import resolve_model

    where = resolve_model(name)
    if isinstance(where, str):
        return preset(where), f"preset {where}"
    return SambaYConfig.from_json(where / "config.json"), str(where)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def describe(cfg: SambaYConfig, source: str, kv_bytes: int = 2) -> dict:
    kinds = cfg.layer_kinds
    rows = []
    for i, kind in enumerate(kinds):
        role = ROLE[kind]
        if kind == SWA:
            role += f" (window {cfg.sliding_window})" if cfg.sliding_window else " (no window: full)"
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
    print(f"model       {info['source']}")
    print(f"layout      {info['layout']}   (M Mamba, S sliding-window attn, A full attn | G GMU, X cross-attn)")
    print(f"parameters  {info['parameters']:,}")
    print(f"hidden      {cfg.hidden_size}, intermediate {cfg.intermediate_size}, heads {info['heads']}")
    print(f"mamba       d_inner {cfg.d_inner}, d_state {cfg.mamba_d_state}, d_conv {cfg.mamba_d_conv}, "
          f"dt_rank {cfg.dt_rank}")
    dt = cfg.torch_dtype
    print(f"state       {info['state_bytes_per_token']:,} bytes per token of context ({dt} K/V of one "
          f"layer) + {_gib(info['state_bytes_fixed'])} fixed per sequence")
    print(f"context     up to {cfg.max_position_embeddings:,} tokens")
    print("layers:")
    half = cfg.kv_layer
    for i, role in enumerate(info["layers"]):
        part = "self-decoder " if i <= half else "cross-decoder"
        print(f"  {i:3d}  {part}  {role}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's layer layout, parameter count and state size",
                       description="Show a model's layer layout, parameter count and decode-state "
                                   "bytes per token, reading only its config.json.")
    p.add_argument("--model", help="model folder, Hugging Face repo id, or preset name "
                                   "(default: the embedded default model)")
    p.add_argument("--preset", help="same as --model with a preset name, e.g. phi4-mini-flash")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_info)
