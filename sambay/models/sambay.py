"""The SambaY decoder-hybrid-decoder (Phi-4-mini-flash-reasoning), in plain PyTorch.

    self-decoder:  Mamba / sliding-window attention, alternating, for layers 0 .. L/2-1
                   layer L/2:   Mamba that also emits the shared memory y
                   layer L/2+1: full attention that also emits the shared K/V
    cross-decoder: GMU (reads the memory) / cross-attention (reads the K/V), alternating

Module and parameter names follow the Hugging Face checkpoint (`model.layers.N.attn.A_log`, ...)
so loading is `load_state_dict` with no renaming. Every mixer has one `forward` for any number of
tokens, with or without a `DecodeState`; there is no separate decode code path to drift apart.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from sambay.kernels import native as kernels
from sambay import ops
from sambay.kernels.linear import GEMV_MAX_ROWS, PackedLinear
from sambay.models.config import (CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA, Phi3Config,
                     SambaYConfig)
from sambay.errors import SambayError

# Parameters kept in float32 whatever the model dtype, as in the released checkpoint.
FP32_PARAMS = ("A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
# Differential attention keeps its values in column blocks this wide: the decode kernel weighs 32
# dims at a time, and each block is then one sequential stream (paired at 32K keys: 1.16x the
# attention over rows of 2hd = 128 dims, whose 32-dim sweeps read every 4th cache line).
VALUE_BLOCK = 32


class Positions:
    """Where the current tokens sit: absolute positions (B, T) and which are real (not padding).

    `memo` holds what every layer of a kind would otherwise recompute within one forward call
    (ring-buffer positions, attention masks); it lives exactly as long as the call.
    """

    def __init__(self, pos: torch.Tensor, valid: torch.Tensor, state: DecodeState | None):
        self.pos, self.valid, self.state = pos, valid, state
        self.padded = not bool(valid.all())
        self.memo: dict = {}

    def select(self, keep: int) -> Positions:
        return Positions(self.pos[:, -keep:], self.valid[:, -keep:], self.state)


# ---------------------------------------------------------------------------------------------
# Decode state
# ---------------------------------------------------------------------------------------------


class DecodeState:
    """Preallocated decode state for a batch of sequences, indexed by layer. (The Transformer baseline
    uses the same object: each of its layers keeps K/V like the full-attention layer here.)

    Mamba layers: conv window (B, d_conv-1, e) and SSM state (B, e, n) in float32.
    SWA layers: K/V ring buffers holding the last `window` positions (slot = position % window).
    The full-attention layer L/2+1: K/V of every position up to `max_length` (the only state that
    grows); the cross-decoder reads it and owns nothing. `valid[b, p]` says position p of row b
    holds a real token; `lengths[b]` how many positions row b has consumed. Rows can sit at different
    lengths while decoding, which is what batching of ragged requests needs.
    """

    def __init__(self, model: CausalLM, batch_size: int, max_length: int):
        p = model.model.embed_tokens.weight
        dtype, device = (p.dtype if p.dtype.is_floating_point else torch.float32), p.device
        self.batch_size, self.max_length = batch_size, max_length
        L = len(model.model.layers)
        self.conv: list[torch.Tensor | None] = [None] * L
        self.ssm: list[torch.Tensor | None] = [None] * L
        self.k: list[torch.Tensor | None] = [None] * L
        self.v: list[torch.Tensor | None] = [None] * L
        for i, layer in enumerate(model.model.layers):  # each layer says what it keeps
            for name, (shape, fp32) in layer.state_shapes(batch_size, max_length).items():
                getattr(self, name)[i] = torch.zeros(shape, dtype=torch.float32 if fp32 else dtype,
                                                     device=device)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.views: dict = {}  # views of these tensors the decode blocks reuse from step to step
        # Whole-step plans (StepPlan), shared with the row views and keyed by which rows.
        self.plans: dict = {}
        self.rows_key: tuple = ()

    def rows(self, index: int | slice) -> DecodeState:
        """A view of some rows: writing through it writes into this state (no copies)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        view = copy.copy(self)
        for name in ("conv", "ssm", "k", "v"):
            setattr(view, name, [None if t is None else t[index] for t in getattr(self, name)])
        view.valid, view.lengths = self.valid[index], self.lengths[index]
        view.views = {}
        view.rows_key = self.rows_key + ((index.start, index.stop, index.step),)
        view.batch_size = view.lengths.shape[0]
        return view

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src` (used to keep a batch's active rows contiguous).
        Only the K/V slots that hold positions are copied."""
        used = int(self.lengths[src])
        for t in self.conv + self.ssm:
            if t is not None:
                t[dst].copy_(t[src])
        for t in self.k + self.v:
            if t is not None:  # (B, heads, [blocks,] slots, width); slot = position % slots
                n = min(used, t.shape[-2])
                t[dst][..., :n, :].copy_(t[src][..., :n, :])
        self.valid[dst].copy_(self.valid[src])
        self.lengths[dst] = self.lengths[src]

    def reset(self) -> None:
        """Empty every row (K/V need no clearing: `valid` hides stale slots)."""
        for t in self.conv + self.ssm:
            if t is not None:
                t.zero_()
        self.valid.zero_()
        self.lengths.zero_()

    def nbytes(self) -> int:
        tensors = [t for t in self.conv + self.ssm + self.k + self.v if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# Mixers
# ---------------------------------------------------------------------------------------------


def _native_block(rows: int, *linears):
    """(native module, each linear as the blocks take it) when these layers can run as one native
    decode block: packed weights (quant.PackedLinear) at GEMV sizes and no autograd; else None."""
    mod = kernels.blocks() if rows <= GEMV_MAX_ROWS else None
    if mod is None:
        return None
    args = []
    for lin in linears:
        a = lin.native() if type(lin) is PackedLinear else None
        if a is None:
            return None
        args.append(a)
    return mod, args


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return kernels._EMPTY if t is None else t


def _cached(owner: nn.Module, attr: str, params: tuple, compute, *extra):
    """compute(), a value derived from `params` (and `extra`) alone, kept on owner.attr while they
    are unchanged and no gradient is wanted: decoding asks for it again at every step."""
    if torch.is_grad_enabled():
        return compute()
    key = tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in params) + extra
    hit = getattr(owner, attr, None)
    if hit is None or hit[0] != key:
        hit = (key, compute())
        setattr(owner, attr, hit)
    return hit[1]


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
        B, T, d = h.shape
        blk = self.block(at, layer, B) if T == 1 and h.dtype == torch.float32 else None
        if blk is not None:
            mod, args = blk
            out, y = mod.mamba_step(h.reshape(B, d), *args)
            return out.view(B, 1, d), (y.unsqueeze(1) if self.emits_memory else memory)
        conv_state = at.state.conv[layer] if at.state is not None else None
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, e) each
        if conv_state is not None and x.shape[1] == 1 and not at.padded:  # decode: one conv step
            w = self.conv1d.weight[:, 0, :]
            x = ops.conv_step(x[:, 0], conv_state, w, self.conv1d.bias).unsqueeze(1)
        elif at.padded:  # padding must not enter the conv window or the state
            mask = at.valid.unsqueeze(-1).to(x.dtype)
            x = F.silu(self._conv(x * mask, at, layer)) * mask
        else:
            x = F.silu(self._conv(x, at, layer))
        dt_low, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if isinstance(self.dt_proj, nn.Linear):  # the SSM adds the dt bias in float32
            dt = F.softplus(F.linear(dt_low, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        else:  # a PackedLinear built to return float32 with its bias added in float32
            dt = F.softplus(self.dt_proj(dt_low))
        A = self._A()
        state = at.state.ssm[layer] if at.state is not None else None
        args = (x.float(), dt, A, Bm.float(), Cm.float(), self.D.float())
        if x.shape[1] == 1 and state is not None:
            y = ops.selective_state_step(*(a[:, 0] if a.dim() == 3 else a for a in args), state)
            y = y.unsqueeze(1)
        else:
            y, final = ops.selective_scan(*args, state=state)
            if state is not None:
                state.copy_(final)
        out = self.out_proj(ops.silu_mul(z.float(), y).to(h.dtype))
        return out, (y if self.emits_memory else memory)

    def block(self, at: Positions, layer: int, rows: int):
        """(native module, mamba_step's arguments after x) when a decode step of `rows` rows (one
        token each, float32 input) can run as one native call; else None."""
        state = at.state
        if state is None or at.padded or self.D.dtype != torch.float32 or self.conv1d.weight.dtype != torch.float32:
            return None
        blk = _native_block(rows, self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        if blk is None or not state.conv[layer].is_contiguous():
            return None
        mod, (inp, xp, dtp, outp) = blk
        return mod, (inp, state.conv[layer], self.conv1d.weight[:, 0, :], _or_empty(self.conv1d.bias), xp, dtp,
                     self._A(), self.D, state.ssm[layer], outp)

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log), the same matrix at every decode step."""
        return _cached(self, "_A_cached", (self.A_log,), lambda: -torch.exp(self.A_log.float()))

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
        B, T, d = h.shape
        blk = self.block(B * T) if h.dtype == memory.dtype == torch.float32 else None
        if blk is not None:
            mod, args = blk
            out = mod.gmu_step(h.reshape(B * T, d), memory.reshape(B * T, -1), *args)
            return out.view(B, T, d), memory
        return self.out_proj(ops.silu_mul(self.in_proj(h), memory.to(h.dtype))), memory

    def block(self, rows: int):
        """(native module, gmu_step's arguments after x and the memory) for `rows` float32 rows, or None."""
        return _native_block(rows, self.in_proj, self.out_proj)


class DiffLambda(nn.Module):
    """The differential-attention parameters (named `inner_cross_attn` in the checkpoint)."""

    def __init__(self, head_dim: int):
        super().__init__()
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.empty(head_dim, dtype=torch.float32)))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)
        self._lam_cached: tuple | None = None

    def lam(self, lambda_init: float) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, the same scalar at every decode step."""
        ps = (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2)
        return _cached(self, "_lam_cached", ps, lambda: torch.exp(torch.dot(ps[0].float(), ps[1].float()))
                       - torch.exp(torch.dot(ps[2].float(), ps[3].float())) + lambda_init, lambda_init)


class Attention(nn.Module):
    """Self-, full- or cross-attention, differential (pairs of heads) or plain.

    K/V are kept in a "cache layout" in every case, fresh or cached, so there is one attend path:
    differential: K (B, Hkv, S, hd) with heads ordered [even..., odd...], V (B, Hkv/2, S, 2hd)
    with head pairs side by side, stored in column blocks (B, Hkv/2, 2hd / w, S, w) of width
    w = VALUE_BLOCK (ops.value_blocks); plain: K, V (B, Hkv, S, hd).
    """

    def __init__(self, cfg: SambaYConfig, layer: int, cross: bool):
        super().__init__()
        H, Hkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.H, self.Hkv, self.hd, self.cross = H, Hkv, hd, cross
        self.window = cfg.window_of(layer)
        self.diff = cfg.differential_attention
        self.lambda_init = cfg.lambda_init(layer)
        self.dropout = cfg.attention_dropout
        self.Wqkv = nn.Linear(d, (H if cross else H + 2 * Hkv) * hd, bias=True)
        self.out_proj = nn.Linear(H * hd, d, bias=True)
        if self.diff:
            self.inner_cross_attn = DiffLambda(hd)

    def state_shapes(self, batch: int, max_length: int) -> dict[str, tuple[tuple, bool]]:
        """K/V buffers: every position (full attention) or a ring of the last `window` ones."""
        slots = max_length if self.window is None else min(self.window, max_length)
        kshape, vshape = self.cache_shapes(batch, slots)
        return {"k": (kshape, False), "v": (vshape, False)}

    def cache_shapes(self, batch: int, slots: int):
        if self.diff:
            w = self.value_block
            return (batch, self.Hkv, slots, self.hd), (batch, self.Hkv // 2, 2 * self.hd // w, slots, w)
        return (batch, self.Hkv, slots, self.hd), (batch, self.Hkv, slots, self.hd)

    @property
    def value_block(self) -> int:
        """Width of the differential values' column blocks: VALUE_BLOCK, or all 2hd if it does not divide."""
        return VALUE_BLOCK if (2 * self.hd) % VALUE_BLOCK == 0 else 2 * self.hd

    def to_cache_layout(self, k, v):
        """k, v (B, T, Hkv, hd) -> cache layout (see class docstring)."""
        B, T = k.shape[:2]
        if self.diff:
            k = torch.cat([k[:, :, 0::2], k[:, :, 1::2]], dim=2)
            v = ops.value_blocks(v.reshape(B, T, self.Hkv // 2, 2 * self.hd).transpose(1, 2), self.value_block)
            return k.transpose(1, 2), v
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, h, at: Positions, layer: int, shared_kv=None):
        B, T, _ = h.shape
        if T == 1 and (self.cross or at.state is not None) and h.dtype == torch.float32:
            done = self._decode_block(h, at, layer, shared_kv)
            if done is not None:
                return done
        qkv = self.Wqkv(h)
        q = qkv[..., : self.H * self.hd].view(B, T, self.H, self.hd)
        if self.cross:
            k, v, k_pos, k_valid = shared_kv
        elif T == 1 and at.state is not None:  # decode: the new K/V go straight into the cache
            k, v, k_pos, k_valid = self._with_cache(qkv[:, 0, self.H * self.hd:], None, at, layer)
        else:
            kv = qkv[..., self.H * self.hd:].view(B, T, 2 * self.Hkv, self.hd)
            k, v = self.to_cache_layout(kv[:, :, : self.Hkv], kv[:, :, self.Hkv:])
            k, v, k_pos, k_valid = self._with_cache(k, v, at, layer)
        o = self._attend(q, k, v, at, k_pos, k_valid)
        out = self.out_proj(o.to(h.dtype))
        return out, ((k, v, k_pos, k_valid) if not self.cross else shared_kv)

    def _with_cache(self, k, v, at: Positions, layer: int):
        """Merge fresh K/V (cache layout) with the state's; returns keys, values, positions, validity.
        v None (decode, one token per row): k is the projection's (B, 2 * Hkv * hd) keys and values."""
        state = at.state
        if state is None:
            return k, v, at.pos, at.valid
        kc, vc = state.k[layer], state.v[layer]
        slots, T = kc.shape[2], (1 if v is None else k.shape[2])
        start = at.pos[:, 0]  # (B,) first new position of each row
        if self.window is None or slots == state.max_length or T == 1:  # slot = position, or decode
            self._store(kc, vc, k, v, start, slots)
            return self._cache_view(at, kc, vc, start)
        # Ring buffer of the last `slots` positions, prefill.
        ring_pos = _ring_positions(start, slots)
        keys = torch.cat([kc, k], dim=2)
        vals = torch.cat([vc, v], dim=-2)
        pos = torch.cat([ring_pos, at.pos], dim=1)
        valid = torch.cat([_gather_valid(state.valid, ring_pos), at.valid], dim=1)
        keep = min(T, slots)
        _write(kc, vc, k[:, :, -keep:], v[..., -keep:, :], start + T - keep, slots)
        return keys, vals, pos, valid

    def _cache_view(self, at: Positions, kc, vc, start: torch.Tensor):
        """The cache as keys, values, positions, validity, once this call's positions are written
        (every call for slot = position; one token per row for a ring buffer, which then holds
        exactly the window)."""
        state, slots = at.state, kc.shape[2]
        if self.window is None or slots == state.max_length:
            if "linear" not in at.memo:
                used = int(at.pos.max()) + 1
                pos = torch.arange(used, device=kc.device).expand(kc.shape[0], used)
                at.memo["linear"] = (used, pos, state.valid[:, :used])
            used, pos, valid = at.memo["linear"]
            return kc[:, :, :used], vc[..., :used, :], pos, valid
        if ("ring", slots) not in at.memo:
            ring_pos = _ring_positions(start + 1, slots)
            at.memo["ring", slots] = (ring_pos, _gather_valid(state.valid, ring_pos))
        ring_pos, ring_valid = at.memo["ring", slots]
        return kc, vc, ring_pos, ring_valid

    def _decode_mask(self, at: Positions, k_pos, k_valid):
        """One mask per step for all layers reading the same keys: (B, 1, 1, S)."""
        key = ("mask", self.window, id(k_pos))
        if key not in at.memo:
            at.memo[key] = (k_pos, ops.attention_mask(at.pos, k_pos, k_valid, self.window))
        return at.memo[key][1]

    def _decode_block(self, h, at: Positions, layer: int, shared_kv):
        """A decode step as one native call (kernels.BLOCKS): the projections, the cache write, the
        attention and (differential) the combination. None where it does not apply; nothing has
        been written then. The rest of this class is its reference."""
        B, _, d = h.shape
        blk = self.block(at, layer, shared_kv, B)
        if blk is None:
            return None
        mod, args, shared = blk
        return mod.attention_step(h.reshape(B, d), *args).view(B, 1, d), shared

    def block(self, at: Positions, layer: int, shared_kv, rows: int):
        """(native module, attention_step's arguments after x, the K/V the next layers share) for a
        decode step of `rows` rows, or None when it cannot run as one native call."""
        blk = _native_block(rows, self.Wqkv, self.out_proj)
        p = self.inner_cross_attn if self.diff else None
        if blk is None or (p is not None and p.subln.weight.dtype != torch.float32):
            return None
        mod, (qkv, outp) = blk
        kc, vc, slot, k_all, v, mask, shared = self.block_keys(at, layer, shared_kv)
        if k_all is False:  # not laid out for the native kernel
            return None
        if p is not None:
            extra = (float(p.lam(self.lambda_init)), p.subln.weight, p.subln.eps, 1 - self.lambda_init)
        else:
            extra = (0.0, kernels._EMPTY, 0.0, 1.0)
        return mod, (qkv, self.H, kc, vc, slot, k_all, v, mask, *extra, outp), shared

    def block_keys(self, at: Positions, layer: int, shared_kv):
        """This step's keys as the native block reads them: the cache and the slot to write (empty
        for cross-attention), the grouped key view (False: not laid out for the kernel), the values,
        the mask (B, S), and the (k, v, k_pos, k_valid) the next layers share."""
        if self.cross:
            k, v, k_pos, k_valid = shared_kv
            kc = vc = slot = kernels._EMPTY
        else:
            kc, vc = at.state.k[layer], at.state.v[layer]
            start = at.pos[:, 0]
            if ("slot", kc.shape[2]) not in at.memo:
                at.memo["slot", kc.shape[2]] = torch.remainder(start, kc.shape[2])
            slot = at.memo["slot", kc.shape[2]]
            k, v, k_pos, k_valid = self._cache_view(at, kc, vc, start)
        key = ("block keys", id(k), self.diff, self.window)  # the same for every layer reading k
        hit = at.memo.get(key)
        if hit is None or hit[0] is not k:
            views = at.state.views if at.state is not None else {}  # a ring buffer: the same at every step
            k_all = views[id(k)][1] if id(k) in views and views[id(k)][0] is k else None
            if k_all is None:
                half = self.Hkv // 2
                k_all = ops.grouped_keys([k[:, :half], k[:, half:]] if self.diff else [k], v)
                k_all = False if k_all is None else k_all  # False: not laid out for the kernel
                if not self.cross and k is kc:
                    views[id(k)] = (k, k_all)
            hit = at.memo[key] = (k, k_all, self._decode_mask(at, k_pos, k_valid).reshape(at.pos.shape[0], -1))
        _, k_all, mask = hit
        return kc, vc, slot, k_all, v, mask, ((k, v, k_pos, k_valid) if not self.cross else shared_kv)

    def _store(self, kc, vc, k, v, start: torch.Tensor, slots: int) -> None:
        if v is None:  # one token per row, as projected
            ops.kv_write(k, kc, vc, torch.remainder(start, slots), self.diff)
        else:
            _write(kc, vc, k, v, start, slots)

    def _attend(self, q, k, v, at: Positions, k_pos, k_valid):
        """q (B, T, H, hd) over keys/values in cache layout -> (B, T, H * hd)."""
        drop = self.dropout if self.training else 0.0
        B, T = q.shape[:2]
        if T > 1:  # float32 in a packed model, whose K/V cache keeps the model's dtype
            q = q.to(k.dtype)
        q_pos, mask = at.pos, None
        if T == 1:  # decode
            mask = self._decode_mask(at, k_pos, k_valid)
        if not self.diff:
            o = ops.attention(q.transpose(1, 2), k, v, q_pos, k_pos, k_valid, self.window, drop, mask)
            return o.transpose(1, 2).reshape(B, T, self.H * self.hd)
        half = self.Hkv // 2
        q1, q2 = q[:, :, 0::2].transpose(1, 2), q[:, :, 1::2].transpose(1, 2)  # (B, H/2, T, hd)
        p = self.inner_cross_attn
        if mask is not None and not drop:  # decode: both halves in one pass over K and V
            lam = float(p.lam(self.lambda_init))
            o = ops.decode_diff_attention([q1, q2], [k[:, :half], k[:, half:]], v, mask, lam)  # (B, 1, H/2, 2hd)
            o = ops.diff_combine(o.unsqueeze(3), lam, p.subln.weight, p.subln.eps, 1 - self.lambda_init)
            return o.view(B, 1, self.H * self.hd)
        v = ops.value_rows(v)
        a1 = ops.attention(q1, k[:, :half], v, q_pos, k_pos, k_valid, self.window, drop, mask)
        a2 = ops.attention(q2, k[:, half:], v, q_pos, k_pos, k_valid, self.window, drop, mask)
        o = a1.float() - p.lam(self.lambda_init) * a2.float()  # (B, H/2, T, 2hd)
        o = F.rms_norm(o, (2 * self.hd,), p.subln.weight.float(), p.subln.eps) * (1 - self.lambda_init)
        return o.transpose(1, 2).reshape(B, T, self.H * self.hd)


def _ring_positions(length: torch.Tensor, slots: int) -> torch.Tensor:
    """Position held by each ring slot once `length` (B,) positions were written; < 0 if none."""
    last = length.unsqueeze(1) - 1
    s = torch.arange(slots, device=length.device)
    return last - torch.remainder(last - s, slots)


def _gather_valid(valid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (pos >= 0) & valid.gather(1, pos.clamp(min=0))


def _write(kc, vc, k, v, start: torch.Tensor, slots: int) -> None:
    """Write T fresh positions per row, starting at start[b], into slots position % slots."""
    T = k.shape[2]
    k, v = k.to(kc.dtype), v.to(vc.dtype)  # packed models compute K/V in float32 (quant.py)
    if T == 1:  # values: (B, H, S, d) or in column blocks (B, H, nb, S, w); positions are dim -2
        rows = torch.arange(kc.shape[0], device=kc.device)
        slot = torch.remainder(start, slots)
        kc[rows, :, slot] = k[:, :, 0]
        vc[rows, ..., slot, :] = v[..., 0, :]
        return
    s0 = int(start[0])
    if not bool((start == s0).all()):
        raise SambayError("a multi-token call with a state needs every row at the same length; "
                          "prefill rows of different lengths one at a time with state.rows(i)")
    idx = torch.remainder(torch.arange(s0, s0 + T, device=kc.device), slots)
    kc[:, :, idx] = k
    vc[..., idx, :] = v


# ---------------------------------------------------------------------------------------------
# Layers and model
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, cfg: SambaYConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, h):
        gate, up = self.fc1(h).chunk(2, dim=-1)
        return self.fc2(ops.silu_mul(gate, up))


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
        blk = _native_block(B * T, self.mlp.fc1, self.mlp.fc2)
        if blk is not None:  # a decode step: straight to the native module
            h = h.reshape(B * T, d)
            x = blk[0].add_layer_norm(h, kernels._EMPTY, ln1.weight, _or_empty(ln1.bias), ln1.eps)[1]
        else:
            h, x = ops.add_layer_norm(h.reshape(B * T, d), None, ln1.weight, ln1.bias, ln1.eps)
        mixed, carry = self.attn(x.view(B, T, d), at, self.index, carry)
        if blk is not None and mixed.dtype == torch.float32:
            mod, (fc1, fc2) = blk
            h = mod.mlp_step(h, mixed.reshape(B * T, d), ln2.weight, _or_empty(ln2.bias), ln2.eps, fc1, fc2)
            return h.view(B, T, d), carry
        h, x = ops.add_layer_norm(h, mixed.reshape(B * T, d), ln2.weight, ln2.bias, ln2.eps)
        h = h + self.mlp(x.view(B, T, d)).reshape(B * T, d)
        return h.view(B, T, d), carry


class SambaYModel(nn.Module):
    def __init__(self, cfg: SambaYConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CausalLM(nn.Module):
    """What every model family shares: the engine's calling convention, positions, the output head.

    A family subclass has `config`, `model.embed_tokens`, `model.layers` (each with
    `state_shapes(batch, max_length)`), and `_body(h, at, keep, hidden)` running its layers and final
    norm. `lm_head` None means the head is the tied embedding; quantization may install its own module.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lm_head: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_state(self, batch_size: int = 1, max_length: int | None = None) -> DecodeState:
        max_length = max_length or self.config.max_position_embeddings
        return DecodeState(self, batch_size, max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: DecodeState | None = None, logits_to_keep: int | None = None,
                output_hidden_states: bool = False):
        """input_ids (B, T). attention_mask (B, T): 0 marks left padding.

        Without a state: one causal forward; logits for all T positions unless `logits_to_keep`.
        With a state: consumes the tokens after those it holds and returns the logits of the last
        `logits_to_keep` (default 1) positions (SambaY runs only those through its cross-decoder).
        """
        B, T = input_ids.shape
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(torch.bool))
        if state is None:
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
            keep = T if logits_to_keep in (None, 0) else logits_to_keep
        else:
            pos = self._claim_positions(state, valid)
            keep = 1 if logits_to_keep is None else (T if logits_to_keep == 0 else logits_to_keep)
        at = Positions(pos, valid, state)
        if keep < 1 or keep > T:
            raise SambayError(f"logits_to_keep must be between 1 and the number of tokens ({T}), got {keep}")

        h = self.model.embed_dropout(self.model.embed_tokens(input_ids)).float()
        hidden = [h] if output_hidden_states else None
        h = self._body(h, at, keep, hidden)  # (B, keep, d), final norm applied
        if hidden is not None:
            hidden[-1] = h
        logits = self.logits(h[:, -keep:])
        if state is not None:
            state.lengths += T
        return (logits, hidden) if output_hidden_states else logits

    def _body(self, h: torch.Tensor, at: Positions, keep: int, hidden: list | None) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h).float()
        return F.linear(h, self.model.embed_tokens.weight).float()

    def _claim_positions(self, state: DecodeState, valid: torch.Tensor) -> torch.Tensor:
        """Check the call fits the state, mark the new positions valid, and return them (B, T)."""
        B, T = valid.shape
        if B != state.batch_size:
            raise SambayError(f"input has batch size {B} but the state was made for {state.batch_size}")
        if T > 1 and not bool((state.lengths == state.lengths[0]).all()):
            raise SambayError("a multi-token call with a state needs every row at the same length; "
                              "prefill rows of different lengths one at a time with state.rows(i)")
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise SambayError("attention_mask may only mark padding at the start of a row (left padding)")
        if not bool(valid.all()) and bool((state.lengths > 0).any()):
            raise SambayError("padding is only allowed in the first call on a state (the prompt)")
        end = int(state.lengths.max()) + T
        if end > state.max_length:
            raise SambayError(f"the sequence would reach {end} tokens but the state holds at most "
                              f"{state.max_length}; make the state with a larger max_length")
        pos = state.lengths.unsqueeze(1) + torch.arange(T, device=valid.device)
        state.valid.scatter_(1, pos, valid)
        return pos

    def init_weights(self, seed: int = 0, fast: bool = False) -> CausalLM:
        """Random initialization for training from scratch (Mamba's own init for its SSM parts).

        fast: fill large matrices by tiling one pool of 4M random normals instead of drawing every
        value: the same scales at memory speed (seconds, not minutes, for 3.8B parameters). Meant
        for speed benchmarks with random weights, not for training.
        """
        g = torch.Generator().manual_seed(seed)
        pool = torch.randn(_POOL, generator=g) if fast else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            _init_param(name, p, std, self.config, g, pool)
        return self


class SambaY(CausalLM):
    """The causal LM. `model(ids)` -> logits (B, T, V); with `state=` it prefills or decodes."""

    def __init__(self, config: SambaYConfig):
        super().__init__(config)
        self.model = SambaYModel(config)

    def _body(self, h, at: Positions, keep: int, hidden: list | None) -> torch.Tensor:
        T = h.shape[1]
        if T == 1 and hidden is None and at.state is not None and kernels.STEP:
            done = self._native_step(h, at)
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


    def _native_step(self, h, at: Positions) -> torch.Tensor | None:
        """A decode step's layers as one native call (kernels.STEP), or None where some layer has no
        native block (the layers then run one by one). The plan, every layer's block arguments, is
        built on the first step of a state's rows and kept on the state; each step recomputes only
        the key sets (slots, masks, the growing K/V view)."""
        B, _, d = h.shape
        mod = kernels.blocks()
        if at.padded or h.dtype != torch.float32 or mod is None:
            return None
        state = at.state
        key = (id(self), state.rows_key)
        plan = state.plans.get(key)
        if plan is None or plan is not False and not plan.current():
            plan = state.plans[key] = StepPlan.build(self, at, B) or False
        if plan is False:
            return None
        keys = plan.keys(at)
        if keys is None:
            return None
        return mod.decode_layers(h.reshape(B, d), plan.kinds, plan.tensors, plan.scalars, keys).view(B, 1, d)


class StepPlan:
    """The arguments of `decode_layers` that stay the same from step to step: per layer its kind,
    tensors (norms, packed weights, state tensors) and numbers, in the order DecoderLayer's fast path
    passes them to the blocks. Attention layers read a key set: slot, mask and, for K/V views that
    move (the growing full-attention cache, which cross-attention shares), the view itself; one
    layer of each set (`reps`) recomputes it every step. A plan is rebuilt when the model's packed
    linear layers or their weights were replaced since (quantized, tiled, loaded)."""

    # csrc/glue.cpp's DecodeKind: Mamba, the memory Mamba, GMU, attention (cross-attention has no
    # cache of its own to write: empty kc, vc).
    KINDS = {MAMBA: 0, MEMORY_MAMBA: 1, GMU: 2, SWA: 3, KV_ATTENTION: 3, CROSS_ATTENTION: 3}

    def __init__(self):
        self.kinds: list[int] = []
        self.tensors: list[list[torch.Tensor]] = []
        self.scalars: list[list[float]] = []
        self.reps: list[tuple[Attention, int]] = []
        self.linears: list[tuple[dict, str, PackedLinear, torch.Tensor]] = []

    def current(self) -> bool:
        """Whether every packed linear layer and its weight are still those the plan was built with."""
        return all(mods[name] is lin and lin._buffers["weight"] is w for mods, name, lin, w in self.linears)

    @classmethod
    def build(cls, model: SambaY, at: Positions, rows: int) -> StepPlan | None:
        plan, sets, shared = cls(), {}, None
        plan.linears = [(parent._modules, name, lin, lin._buffers["weight"]) for parent in model.modules()
                        for name, lin in parent._modules.items() if isinstance(lin, PackedLinear)]
        for layer in model.model.layers:
            ln1, ln2, m, i = layer.input_layernorm, layer.post_attention_layernorm, layer.attn, layer.index
            mlp = _native_block(rows, layer.mlp.fc1, layer.mlp.fc2)
            if mlp is None or layer.training or ln1.weight.dtype != torch.float32 or layer.kind not in cls.KINDS:
                return None
            t = [ln1.weight, _or_empty(ln1.bias), ln2.weight, _or_empty(ln2.bias), *mlp[1][0], *mlp[1][1]]
            sc = [ln1.eps, ln2.eps]
            if layer.kind in (MAMBA, MEMORY_MAMBA, GMU):
                blk = m.block(at, i, rows) if layer.kind != GMU else m.block(rows)
                if blk is None:
                    return None
                t += [x for a in blk[1] for x in (a if isinstance(a, list) else [a])]
            else:
                blk = m.block(at, i, shared, rows)
                if blk is None:
                    return None
                _, (qkv, H, kc, vc, slot, k_all, v, mask, lam, sub_w, sub_eps, scale, outp), shared = blk
                moving = m.cross or m.window is None or kc.shape[2] == at.state.max_length
                ident = (id(mask), id(k_all) if moving else None)
                if ident not in sets:
                    if m.cross:  # its keys come from the layer that wrote them, which must come first
                        return None
                    sets[ident] = len(plan.reps)
                    plan.reps.append((m, i))
                t += [*qkv, *outp, kc, vc, kernels._EMPTY if moving else k_all,
                      kernels._EMPTY if moving else v, sub_w]
                sc += [H, lam, sub_eps, scale, sets[ident]]
            plan.kinds.append(cls.KINDS[layer.kind])
            plan.tensors.append(t)
            plan.scalars.append(sc)
        return plan

    def keys(self, at: Positions) -> list[list[torch.Tensor]] | None:
        """This step's key sets: slot, mask, K and V views (the last two unused by a set whose
        layers keep their own, the ring buffers)."""
        out = []
        for m, i in self.reps:
            _, _, slot, k_all, v, mask, _ = m.block_keys(at, i, None)
            if k_all is False:
                return None
            out.append([slot, mask, k_all, v])
        return out


_POOL = 1 << 22


@torch.no_grad()
def _init_param(name: str, p: torch.Tensor, std: float, cfg: SambaYConfig, g: torch.Generator,
                pool: torch.Tensor | None = None) -> None:
    def normal(mean: float, s: float):
        if pool is None or p.numel() <= _POOL:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * s + mean)
            return
        flat, src = p.view(-1), pool.to(p.dtype)
        start = int(torch.randint(0, _POOL // 2, (1,), generator=g))
        for off in range(0, flat.numel(), _POOL - start):
            n = min(_POOL - start, flat.numel() - off)
            flat[off:off + n].copy_(src[start:start + n])
        flat.mul_(s).add_(mean)

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "A_log":  # A = -(1..n) per channel, the S4D-real init
        p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, dtype=torch.float32)).expand_as(p))
    elif leaf == "D":
        p.fill_(1.0)
    elif name.endswith("dt_proj.bias"):  # softplus^-1 of dt log-uniform in [1e-3, 1e-1]
        u = torch.rand(p.shape, generator=g)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        p.copy_(dt + torch.log(-torch.expm1(-dt)))
    elif name.endswith("dt_proj.weight"):
        r = cfg.dt_rank ** -0.5
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * r)
    elif leaf.startswith("lambda_"):
        normal(0.0, 0.1)
    elif name.endswith("conv1d.weight"):
        k = p.shape[-1]
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(k))
    elif leaf == "bias":
        p.zero_()
    elif "layernorm" in name or "subln" in name or name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith(("out_proj.weight", "fc2.weight", "o_proj.weight", "down_proj.weight")):
        normal(0.0, std / math.sqrt(2 * cfg.num_hidden_layers))  # scaled residual projections
    else:
        normal(0.0, std)


def build_model(config, dtype: torch.dtype = torch.float32, device: str = "cpu",
                init: bool = True, seed: int = 0, fast_init: bool = False) -> CausalLM:
    """Build the model of `config`'s family (SambaY, or the Phi3 Transformer baseline) without a
    float32 detour: allocate on the meta device, then materialize directly in `dtype` (a
    3.8B-parameter bf16 model needs 7.7 GB, not 15 GB first)."""
    from sambay.models.phi3 import Phi3  # the baseline's module builds on this one

    with torch.device("meta"):
        model = Phi3(config) if isinstance(config, Phi3Config) else SambaY(config)
    for name, p in model.named_parameters():
        want = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype
        if p.dtype != want:
            p.data = torch.empty(p.shape, dtype=want, device="meta")
    if device == "meta":  # shapes and dtypes only; the checkpoint loader assigns the real tensors
        return model
    model = model.to_empty(device=device)
    if init:
        model.init_weights(seed, fast=fast_init)
    return model.eval()
