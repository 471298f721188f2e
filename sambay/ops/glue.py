"""The decode glue: the small vector operations between a decode step's matrix products (residual
add + layer norm, silu gate, Mamba's conv window step, the differential combination, the K/V cache
write), in PyTorch. The native kernels fuse each of them (kernels.NativeOps); the tests hold the two
equal. Rows are (R, n) views whose last dimension is contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm(h, delta, weight, bias, eps: float):
    """(h + delta, layer_norm(h + delta)) for h, delta (R, d); delta None: (h, layer_norm(h))."""
    h = h if delta is None else h + delta
    return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def silu_mul(a, b):
    """silu(a) * b, for a and b of the same shape (any number of leading dims)."""
    return F.silu(a) * b


def conv_step(x, state, weight, bias):
    """Mamba's causal depthwise conv for one new input per row, then silu. x (B, e); state
    (B, k-1, e) holds the previous inputs (oldest first) and is shifted in place to take x;
    weight (e, k); bias (e,) or None. Returns (B, e) in x's dtype."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(1)], dim=1)  # (B, k, e)
    state.copy_(window[:, 1:])
    out = sum(window[:, j] * weight[:, j] for j in range(weight.shape[1]))
    return F.silu(out + bias if bias is not None else out)


def diff_combine(o, lam: float, weight, eps: float, scale: float):
    """Differential attention's output for one query per row: o (B, 2, Hk, g, dv) holds the
    attention of the q1 and q2 heads; returns rms_norm(o1 - lam * o2) * weight * scale as
    (B, Hk * g * dv), heads in order. o (B, 1, Hk, g, dv) is o1 - lam * o2 already
    (decode_diff_attention's result)."""
    o = o.float()
    mixed = o[:, 0] - lam * o[:, 1] if o.shape[1] == 2 else o[:, 0]
    out = F.rms_norm(mixed, (o.shape[-1],), weight.float(), eps) * scale
    return out.reshape(o.shape[0], -1)


def kv_write(kv, kc, vc, slot, diff: bool):
    """Write one new position per row into a K/V cache. kv (B, 2 * Hkv * hd): the projected keys
    then values; kc (B, Hkv, S, hd), vc (B, Hv, S, dv) with Hv * dv = Hkv * hd, or vc in column
    blocks (B, Hv, nb, S, dv / nb) (value_blocks); slot (B,) int64.
    diff: key heads are stored [even..., odd...] (differential attention's cache layout)."""
    B, Hkv, _, hd = kc.shape
    k = kv[:, : Hkv * hd].reshape(B, Hkv, hd)
    if diff:
        k = torch.cat([k[:, 0::2], k[:, 1::2]], dim=1)
    v = kv[:, Hkv * hd:].reshape(vc.shape[:-2] + vc.shape[-1:])  # (B, Hv, [nb,] width)
    rows = torch.arange(B, device=kc.device)
    kc[rows, :, slot] = k.to(kc.dtype)
    vc[rows, ..., slot, :] = v.to(vc.dtype)
