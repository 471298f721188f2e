"""Attention that keeps K/V, shared by both families: SambaY's sliding-window, full and cross
layers (differential) and the Phi3 baseline's self-attention (plain, with RoPE).

The cache is laid out once for both the prompt and the decode path (see KVAttention), positions are
explicit, so rows of a batch can sit at different lengths, and the sliding window is a ring buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sambay import ops
from sambay.errors import SambayError
from sambay.models.state import Positions

# Differential attention keeps its values in column blocks this wide: the decode kernel weighs 32
# dims at a time, and each block is then one sequential stream (1.16x the attention over rows of
# 2hd = 128 dims at 32K keys, whose 32-dim sweeps read every 4th cache line).
VALUE_BLOCK = 32


class KVAttention(nn.Module):
    """What every K/V-keeping attention shares, differential (pairs of heads) or plain: the decode
    cache and its layout, the ring buffer of a sliding window, and one attend path for prompts and
    decode steps. A subclass adds its projections and its `forward`.

    K/V are kept in a "cache layout" in every case, fresh or cached, so there is one attend path:
    differential: K (B, Hkv, S, hd) with heads ordered [even..., odd...], V (B, Hkv/2, S, 2hd)
    with head pairs side by side, stored in column blocks (B, Hkv/2, 2hd / w, S, w) of width
    w = VALUE_BLOCK (ops.value_blocks); plain: K, V (B, Hkv, S, hd).
    """

    def __init__(self, heads: int, kv_heads: int, head_dim: int, window: int | None, differential: bool,
                 dropout: float, cross: bool = False, lambda_init: float = 0.0):
        super().__init__()
        self.H, self.Hkv, self.hd, self.cross = heads, kv_heads, head_dim, cross
        self.window, self.diff, self.dropout, self.lambda_init = window, differential, dropout, lambda_init

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

    def with_cache(self, k, v, at: Positions, layer: int):
        """Merge fresh K/V (cache layout) with the state's; returns keys, values, positions, validity.
        v None (decode, one token per row): k is the projection's (B, 2 * Hkv * hd) keys and values."""
        state = at.state
        if state is None:
            return k, v, at.pos, at.valid
        kc, vc = state.k[layer], state.v[layer]
        slots, T = kc.shape[2], (1 if v is None else k.shape[2])
        start = at.pos[:, 0]  # (B,) first new position of each row
        if self.window is None or slots == state.max_length or T == 1:  # slot = position, or decode
            self._store(kc, vc, k, v, start, slots, at)
            return self.cache_view(at, kc, vc, start)
        # Ring buffer of the last `slots` positions, prefill.
        ring_pos = _ring_positions(start, slots)
        keys = torch.cat([kc, k], dim=2)
        vals = torch.cat([vc, v], dim=-2)
        pos = torch.cat([ring_pos, at.pos], dim=1)
        valid = torch.cat([_gather_valid(state.valid, ring_pos), at.valid], dim=1)
        keep = min(T, slots)
        _write(kc, vc, k[:, :, -keep:], v[..., -keep:, :], start + T - keep, slots)
        return keys, vals, pos, valid

    def cache_view(self, at: Positions, kc, vc, start: torch.Tensor):
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

    def decode_mask(self, at: Positions, k_pos, k_valid):
        """One mask per step for all layers reading the same keys: (B, 1, 1, S)."""
        key = ("mask", self.window, id(k_pos))
        if key not in at.memo:
            at.memo[key] = (k_pos, ops.attention_mask(at.pos, k_pos, k_valid, self.window))
        return at.memo[key][1]

    def _store(self, kc, vc, k, v, start: torch.Tensor, slots: int, at: Positions) -> None:
        if v is None:  # one token per row, as projected
            at.ops.kv_write(k, kc, vc, torch.remainder(start, slots), self.diff)
        else:
            _write(kc, vc, k, v, start, slots)

    def attend(self, q, k, v, at: Positions, k_pos, k_valid):
        """q (B, T, H, hd) over keys/values in cache layout -> (B, T, H * hd)."""
        drop = self.dropout if self.training else 0.0
        B, T = q.shape[:2]
        if T > 1:  # float32 in a packed model, whose K/V cache keeps the model's dtype
            q = q.to(k.dtype)
        q_pos, mask = at.pos, None
        if T == 1:  # decode
            mask = self.decode_mask(at, k_pos, k_valid)
        if not self.diff:
            if mask is not None and not drop:  # (B, 1, H, hd): K and V read once by the query groups
                o = at.ops.decode_attention([q.transpose(1, 2)], [k], v, mask)
                return o.reshape(B, 1, self.H * self.hd)
            o = ops.attention(q.transpose(1, 2), k, v, q_pos, k_pos, k_valid, self.window, drop, mask)
            return o.transpose(1, 2).reshape(B, T, self.H * self.hd)
        half = self.Hkv // 2
        q1, q2 = q[:, :, 0::2].transpose(1, 2), q[:, :, 1::2].transpose(1, 2)  # (B, H/2, T, hd)
        p = self.inner_cross_attn
        if mask is not None and not drop:  # decode: both halves in one pass over K and V
            lam = float(p.lam(self.lambda_init))
            o = at.ops.decode_diff_attention([q1, q2], [k[:, :half], k[:, half:]], v, mask, lam)  # (B, 1, H/2, 2hd)
            o = at.ops.diff_combine(o.unsqueeze(3), lam, p.subln.weight, p.subln.eps, 1 - self.lambda_init)
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
