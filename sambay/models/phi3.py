"""The Transformer baseline SambaY is measured against: Hugging Face's `Phi3ForCausalLM`.

This is the architecture of Phi-4-mini(-reasoning) and Phi-3: every layer is causal self-attention
(fused `qkv_proj`, RoPE on the first `partial_rotary_factor` of each head, grouped-query K/V) then a
SwiGLU MLP (fused `gate_up_proj`), each behind an RMSNorm. Parameter names are the checkpoint's, so
a real Phi-4-mini folder loads with no renaming. It runs on the same engine, decode state, kernels
and int8 quantization as SambaY: attention reuses `models.attention.KVAttention's cache and attend code, so the
only new pieces are the projections, RMSNorm and RoPE.

RoPE follows transformers exactly, including LongRoPE: within one forward call, the long factors
are used when the call reaches a position beyond `original_max_position_embeddings`, the short
ones otherwise (keys already cached keep the rotation they were written with, as in transformers).
So the engine prefills such a long prompt in one call (`prefill_whole`), as transformers does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sambay.models.config import ATTENTION, Phi3Config
from sambay.models.attention import KVAttention
from sambay.models.base import CausalLM
from sambay.models.state import Positions


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of one call, (B, T, rotary_dim), RoPE's half-split layout.

    The inverse frequencies are made on first use rather than held as buffers: models are built on
    the meta device and materialized without running __init__ again (see models.registry.build_model).
    """

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.dim, self.theta = cfg.rotary_dim, cfg.rope_theta
        self.original_max = cfg.original_max_position_embeddings
        self.factors: dict[str, list[float]] = {}
        self.scaling = 1.0
        if cfg.longrope:
            rs = cfg.rope_scaling
            factor = rs.get("factor") or cfg.max_position_embeddings / self.original_max
            self.scaling = rs.get("attention_factor") or (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max)))
            self.factors = {"short": rs["short_factor"], "long": rs["long_factor"]}
        self._inv_freq: dict[str, torch.Tensor] = {}

    def inv_freq(self, which: str) -> torch.Tensor:
        if which not in self._inv_freq:
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            ext = torch.tensor(self.factors.get(which, [1.0] * (self.dim // 2)), dtype=torch.float32)
            self._inv_freq[which] = 1.0 / (ext * self.theta ** exponents)
        return self._inv_freq[which]

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        long = bool(self.factors) and int(pos.max()) + 1 > self.original_max
        inv = self.inv_freq("long" if long else "short").to(pos.device)
        freqs = pos.unsqueeze(-1).float() * inv  # (B, T, rotary_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); rotates the first cos.shape[-1] dims of each head, leaves the rest."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, r)
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * cos + half * sin, rest], dim=-1)


class SelfAttention(KVAttention):
    """Causal GQA self-attention with RoPE; K/V kept in the plain (non-differential) cache layout."""

    def __init__(self, cfg: Phi3Config, layer: int):
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.window_of(layer),
                         differential=False, dropout=cfg.attention_dropout)
        H, Hkv, hd, d = self.H, self.Hkv, self.hd, cfg.hidden_size
        self.qkv_proj = nn.Linear(d, (H + 2 * Hkv) * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, d, bias=False)

    def forward(self, h, at: Positions, layer: int, rope: tuple[torch.Tensor, torch.Tensor]):
        B, T, _ = h.shape
        qkv = self.qkv_proj(h)
        q = qkv[..., : self.H * self.hd].view(B, T, self.H, self.hd)
        kv = qkv[..., self.H * self.hd:].view(B, T, 2 * self.Hkv, self.hd)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(kv[:, :, : self.Hkv], cos, sin)
        k, v = self.to_cache_layout(k, kv[:, :, self.Hkv:])  # (B, Hkv, T, hd) each
        k, v, k_pos, k_valid = self.with_cache(k, v, at, layer)
        o = self.attend(q, k, v, at, k_pos, k_valid)  # (B, T, H * hd)
        return self.o_proj(o.to(h.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, h):
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class RMSNorm(nn.Module):
    """Phi-3's RMSNorm: normalize in float32, then scale in the input's dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3Config, layer: int):
        super().__init__()
        self.index, self.kind = layer, ATTENTION
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.resid_attn_dropout = nn.Dropout(cfg.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(cfg.resid_pdrop)

    def state_shapes(self, batch: int, max_length: int) -> dict[str, tuple[tuple, bool]]:
        return self.self_attn.state_shapes(batch, max_length)

    def forward(self, h, at: Positions, rope):
        """h: float32 residual stream (B, T, d)."""
        dtype = self.input_layernorm.weight.dtype
        h = h + self.resid_attn_dropout(self.self_attn(self.input_layernorm(h.to(dtype)), at, self.index,
                                                       rope)).float()
        h = h + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(h.to(dtype)))).float()
        return h


class Phi3Model(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class Phi3(CausalLM):
    """The causal LM (`Phi3ForCausalLM`). `model(ids)` -> logits (B, T, V); `state=` to prefill/decode."""

    def __init__(self, config: Phi3Config):
        super().__init__(config)
        self.model = Phi3Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def prefill_whole(self, prompt_len: int) -> bool:
        """True when a prompt must be prefilled in one call to match transformers: with LongRoPE,
        a call reaching past `original_max_position_embeddings` rotates all of its keys with the
        long factors, so chunks would rotate the prompt's first keys differently."""
        rope = self.model.rotary_emb
        return bool(rope.factors) and prompt_len > rope.original_max

    def _body(self, h, at: Positions, keep: int, hidden: list | None) -> torch.Tensor:
        if h.shape[1] == 1 and hidden is None and at.state is not None:  # a decode step: the ops may run it whole
            done = at.ops.decode_step(self, h, at)
            if done is not None:
                return self.model.norm(done.to(self.model.norm.weight.dtype))
        rope = self.model.rotary_emb(at.pos, self.dtype)
        for layer in self.model.layers:
            h = layer(h, at, rope)
            if hidden is not None:
                hidden.append(h)
        return self.model.norm(h[:, -keep:].to(self.model.norm.weight.dtype))
