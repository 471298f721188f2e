"""The SambaY decoder-hybrid-decoder (Phi-4-mini-flash-reasoning), in plain PyTorch.

    self-decoder:  Mamba / sliding-window attention, alternating, for layers 0 .. L/2-1
                   layer L/2:   Mamba that also emits the shared memory y
                   layer L/2+1: full attention that also emits the shared K/V
    cross-decoder: GMU (reads the memory) / cross-attention (reads the K/V), alternating

Module and parameter names follow the Hugging Face checkpoint (`model.layers.N.attn.A_log`, ...)
so loading is `load_state_dict` with no renaming. Every mixer has one `forward` for any number of
tokens, with or without a `DecodeState`; there is no separate decode code path to drift apart.
The decode-time operations come from `at.ops` (PyTorch, or native kernels given from outside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sambay import ops
from sambay.models.attention import KVAttention
from sambay.models.base import CausalLM
from sambay.models.config import CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA, SambaYConfig
from sambay.models.state import Positions
from sambay.ops import TORCH, Ops


# ---------------------------------------------------------------------------------------------
# Mixers
# ---------------------------------------------------------------------------------------------


class Mamba(nn.Module):
    """Mamba-1 selective SSM. The memory layer (L/2) also returns its SSM output y as the memory."""

    def __init__(self, cfg: SambaYConfig, emits_memory: bool = False):
        super().__init__()
        d, e, n, r, k = cfg.hidden_size, cfg.d_inner, cfg.mamba_d_state, cfg.dt_rank, cfg.mamba_d_conv
        self.emits_memory = emits_memory
        self.in_proj = nn.Linear(d, 2 * e, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, bias=cfg.mamba_conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, d, bias=cfg.mamba_proj_bias)
        self.dt_rank, self.d_state = r, n

    def forward(self, h, at: Positions, layer: int, memory=None):
        conv_state = at.state.conv[layer] if at.state is not None else None
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, e) each
        if conv_state is not None and x.shape[1] == 1 and not at.padded:  # decode: one conv step
            w = self.conv1d.weight[:, 0, :]
            x = at.ops.conv_step(x[:, 0], conv_state, w, self.conv1d.bias).unsqueeze(1)
        elif at.padded:  # padding must not enter the conv window or the state
            mask = at.valid.unsqueeze(-1).to(x.dtype)
            x = F.silu(self._conv(x * mask, at, layer)) * mask
        else:
            x = F.silu(self._conv(x, at, layer))
        dt_low, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The SSM adds the dt bias in float32, as the reference does (dt feeds exp()).
        w = self.dt_proj.weight
        dt = F.softplus(F.linear(dt_low, w.to(dt_low.dtype)).float() + self.dt_proj.bias.float())
        A = -torch.exp(self.A_log.float())
        state = at.state.ssm[layer] if at.state is not None else None
        args = (x.float(), dt, A, Bm.float(), Cm.float(), self.D.float())
        if x.shape[1] == 1 and state is not None:
            y = at.ops.selective_state_step(*(a[:, 0] if a.dim() == 3 else a for a in args), state)
            y = y.unsqueeze(1)
        else:
            y, final = ops.selective_scan(*args, state=state)
            if state is not None:
                state.copy_(final)
        out = self.out_proj(at.ops.silu_mul(z.float(), y).to(h.dtype))
        return out, (y if self.emits_memory else memory)

    def _conv(self, x, at: Positions, layer: int):
        """Causal depthwise conv, left-padded by the state's window (or zeros)."""
        k = self.conv1d.weight.shape[-1]
        state = at.state.conv[layer] if at.state is not None else None
        window = state if state is not None else x.new_zeros(x.shape[0], k - 1, x.shape[2])
        xt = torch.cat([window.to(x.dtype), x], dim=1)  # (B, k-1+T, e)
        if state is not None:
            state.copy_(xt[:, -(k - 1):])
        T = x.shape[1]
        w = self.conv1d.weight[:, 0, :]  # (e, k)
        out = sum(xt[:, j:j + T] * w[:, j] for j in range(k))
        return out + self.conv1d.bias if self.conv1d.bias is not None else out


class GatedMemoryUnit(nn.Module):
    """Gated memory unit: out_proj(silu(in_proj(x)) * memory); no state of its own."""

    def __init__(self, cfg: SambaYConfig):
        super().__init__()
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.d_inner, bias=False)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.hidden_size, bias=False)

    def forward(self, h, at: Positions, layer: int, memory):
        return self.out_proj(at.ops.silu_mul(self.in_proj(h), memory.to(h.dtype))), memory


class DiffLambda(nn.Module):
    """The differential-attention parameters (named `inner_cross_attn` in the checkpoint)."""

    def __init__(self, head_dim: int):
        super().__init__()
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.empty(head_dim, dtype=torch.float32)))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)

    def lam(self, lambda_init: float) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, a scalar per layer."""
        return (torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
                - torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float())) + lambda_init)


class Attention(KVAttention):
    """SambaY's self-, full- or cross-attention: fused Wqkv (queries only for cross-attention, which
    reads the K/V the full-attention layer shares), differential in the released model."""

    def __init__(self, cfg: SambaYConfig, layer: int, cross: bool):
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.window_of(layer),
                         cfg.differential_attention, cfg.attention_dropout, cross, cfg.lambda_init(layer))
        H, Hkv, hd, d = self.H, self.Hkv, self.hd, cfg.hidden_size
        self.Wqkv = nn.Linear(d, (H if cross else H + 2 * Hkv) * hd, bias=True)
        self.out_proj = nn.Linear(H * hd, d, bias=True)
        if self.diff:
            self.inner_cross_attn = DiffLambda(hd)

    def forward(self, h, at: Positions, layer: int, shared_kv=None):
        B, T, _ = h.shape
        qkv = self.Wqkv(h)
        q = qkv[..., : self.H * self.hd].view(B, T, self.H, self.hd)
        if self.cross:
            k, v, k_pos, k_valid = shared_kv
        elif T == 1 and at.state is not None:  # decode: the new K/V go straight into the cache
            k, v, k_pos, k_valid = self.with_cache(qkv[:, 0, self.H * self.hd:], None, at, layer)
        else:
            kv = qkv[..., self.H * self.hd:].view(B, T, 2 * self.Hkv, self.hd)
            k, v = self.to_cache_layout(kv[:, :, : self.Hkv], kv[:, :, self.Hkv:])
            k, v, k_pos, k_valid = self.with_cache(k, v, at, layer)
        o = self.attend(q, k, v, at, k_pos, k_valid)
        out = self.out_proj(o.to(h.dtype))
        return out, ((k, v, k_pos, k_valid) if not self.cross else shared_kv)


# ---------------------------------------------------------------------------------------------
# Layers and model
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, cfg: SambaYConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, h, fused: Ops = TORCH):
        gate, up = self.fc1(h).chunk(2, dim=-1)
        return self.fc2(fused.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SambaYConfig, layer: int):
        super().__init__()
        self.index, self.kind = layer, cfg.layer_kinds[layer]
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if self.kind in (MAMBA, MEMORY_MAMBA):
            self.attn = Mamba(cfg, emits_memory=self.kind == MEMORY_MAMBA)
        elif self.kind == GMU:
            self.attn = GatedMemoryUnit(cfg)
        else:
            self.attn = Attention(cfg, layer, cross=self.kind == CROSS_ATTENTION)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def state_shapes(self, batch: int, max_length: int) -> dict[str, tuple[tuple, bool]]:
        """Decode-state tensors this layer keeps: name -> (shape, kept in float32)."""
        if self.kind in (MAMBA, MEMORY_MAMBA):
            m = self.attn
            e, k = m.conv1d.weight.shape[0], m.conv1d.weight.shape[-1]
            return {"conv": ((batch, k - 1, e), False), "ssm": ((batch, e, m.d_state), True)}
        if self.kind in (SWA, KV_ATTENTION):
            return self.attn.state_shapes(batch, max_length)
        return {}  # GMU and cross-attention read what others keep

    def forward(self, h, at: Positions, carry):
        """h: float32 residual stream (B, T, d). `carry` is the shared memory for Mamba/GMU layers and
        the shared K/V for attention layers; each layer passes on what the next of its kind needs."""
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if self.training or ln1.weight.dtype != torch.float32:  # dropout; or norms in low precision
            dtype = ln1.weight.dtype
            mixed, carry = self.attn(ln1(h.to(dtype)), at, self.index, carry)
            h = h + self.resid_dropout(mixed).float()
            h = h + self.resid_dropout(self.mlp(ln2(h.to(dtype)))).float()
            return h, carry
        # Float32 norms (a float32 or packed model, at inference): residual adds and norms fused.
        B, T, d = h.shape
        h, x = at.ops.add_layer_norm(h.reshape(B * T, d), None, ln1.weight, ln1.bias, ln1.eps)
        mixed, carry = self.attn(x.view(B, T, d), at, self.index, carry)
        h, x = at.ops.add_layer_norm(h, mixed.reshape(B * T, d), ln2.weight, ln2.bias, ln2.eps)
        h = h + self.mlp(x.view(B, T, d), at.ops).reshape(B * T, d)
        return h.view(B, T, d), carry


class SambaYModel(nn.Module):
    def __init__(self, cfg: SambaYConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SambaY(CausalLM):
    """The causal LM. `model(ids)` -> logits (B, T, V); with `state=` it prefills or decodes."""

    def __init__(self, config: SambaYConfig):
        super().__init__(config)
        self.model = SambaYModel(config)

    def _body(self, h, at: Positions, keep: int, hidden: list | None) -> torch.Tensor:
        T = h.shape[1]
        if T == 1 and hidden is None and at.state is not None:  # a decode step: the ops may run it whole
            done = at.ops.decode_step(self, h, at)
            if done is not None:
                return self.model.final_layernorm(done.to(self.model.final_layernorm.weight.dtype))
        memory = kv = None
        for layer in self.model.layers:
            if layer.index == self.config.kv_layer + 1 and keep < T:  # cross-decoder: wanted positions only
                h, memory, at = h[:, -keep:], memory[:, -keep:], at.select(keep)
            if layer.kind in (MAMBA, MEMORY_MAMBA, GMU):
                h, memory = layer(h, at, memory)
            else:
                h, kv = layer(h, at, kv)
            if hidden is not None:
                hidden.append(h)
        return self.model.final_layernorm(h.to(self.model.final_layernorm.weight.dtype))
