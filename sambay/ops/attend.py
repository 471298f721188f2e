"""Attention with explicit positions: chunked prompt attention over SDPA, one-query decode attention,
the differential pair of groups, and the value layouts the decode kernels stream.

Each fast function has its `*_ref` twin here or is small enough to be its own; the tests hold them
equal. Prompt attention works in query chunks, so a long prompt never materializes a full T x T
score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Attention with explicit positions.  q (B, Hq, Tq, dk); k (B, Hk, Tk, dk); v (B, Hk, Tk, dv);
# q_pos (B, Tq), k_pos (B, Tk) absolute positions; k_valid (B, Tk) bool (False = padding/empty).
# Query t sees key p when p <= t, p is valid and (window is None or p > t - window). Grouped-query
# heads: query head j uses key/value head j // (Hq / Hk).
# ---------------------------------------------------------------------------------------------


def attention_mask(q_pos, k_pos, k_valid, window: int | None):
    """(B, 1, Tq, Tk) bool mask of allowed (query, key) pairs."""
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    ok = (kp <= qp) & k_valid.unsqueeze(-2)
    if window is not None:
        ok &= kp > qp - window
    # A padded query sees nothing valid; letting it see its own slot keeps its (discarded) output
    # finite instead of NaN, which would otherwise leak through 0 * NaN downstream.
    ok |= kp == qp
    return ok.unsqueeze(1)


def attention_ref(q, k, v, q_pos, k_pos, k_valid, window=None, dropout: float = 0.0):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~attention_mask(q_pos, k_pos, k_valid, window), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


# Upper bound on (query chunk x keys x heads) score elements materialized at once (~256 MB fp32).
_SCORE_BUDGET = 64 * 1024 * 1024


def attention(q, k, v, q_pos, k_pos, k_valid, window=None, dropout: float = 0.0, mask=None):
    """Chunked over queries; each chunk only looks at the key range its positions can reach.
    `mask`: attention_mask(q_pos, k_pos, k_valid, window), when the caller already has it."""
    Bsz, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    if Tq == 1 and dropout == 0.0:
        if mask is None:
            mask = attention_mask(q_pos, k_pos, k_valid, window)
        return decode_attention_groups([q], [k], v, mask)[0]
    chunk = max(16, min(Tq, _SCORE_BUDGET // max(1, Bsz * Hq * Tk)))
    if chunk >= Tq:
        return _sdpa(q, k, v, q_pos, k_pos, k_valid, window, dropout)
    out = q.new_empty(Bsz, Hq, Tq, v.shape[-1])
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        qp = q_pos[:, c0:c1]
        reach = k_pos <= qp.max()
        if window is not None:
            reach &= k_pos > qp.min() - window
        idx = reach.any(0).nonzero()
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 1)
        out[:, :, c0:c1] = _sdpa(q[:, :, c0:c1], k[:, :, lo:hi], v[:, :, lo:hi], qp,
                                 k_pos[:, lo:hi], k_valid[:, lo:hi], window, dropout)
    return out


def _sdpa(q, k, v, q_pos, k_pos, k_valid, window, dropout):
    mask = attention_mask(q_pos, k_pos, k_valid, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          enable_gqa=k.shape[1] != q.shape[1])


def decode_attention_groups(qs, ks, v, mask):
    """One query per row for several query groups sharing the same values (differential
    attention: (q1, k1) and (q2, k2) both over V). qs[i] (B, Hq, 1, dk), ks[i] (B, Hk, S, dk),
    v (B, Hk, S, dv), mask (B, 1, 1, S). Returns a list of (B, Hq, 1, dv), one per group."""
    out = decode_attention_stacked(qs, ks, v, mask)
    return [out[:, i].unsqueeze(2) for i in range(len(qs))]


def decode_attention_stacked(qs, ks, v, mask):
    """decode_attention_groups' results as one tensor (B, G, Hq, dv), in the queries' dtype.
    The native kernel (kernels.NativeOps) streams K and V once for all groups."""
    return torch.stack([_decode_attention(q, k, v, mask)[:, :, 0] for q, k in zip(qs, ks)], dim=1)


def decode_diff_attention(qs, ks, v, mask, lam: float):
    """Differential attention's two groups for one query per row, already combined:
    softmax(q1 k1) V - lam softmax(q2 k2) V as (B, 1, Hq, dv) float32, arguments as
    decode_attention_groups takes them, except that v may be in column blocks (value_rows).
    This computes the groups (decode_attention_stacked) and subtracts; the native kernel weighs
    each value row once for both groups."""
    o = decode_attention_stacked(qs, ks, value_rows(v), mask).float()
    return (o[:, 0] - lam * o[:, 1]).unsqueeze(1)


def value_blocks(v, width: int):
    """Values (B, H, S, dv) -> column blocks (B, H, dv / width, S, width): block i holds dims
    [i width, (i + 1) width) of every row. The differential decode state keeps its values so, which
    makes each 32-dim sweep of the decode kernel one sequential stream (see Attention.cache_shapes)."""
    B, H, S, dv = v.shape
    return v.reshape(B, H, S, dv // width, width).permute(0, 1, 3, 2, 4)


def value_rows(v):
    """value_blocks undone: (B, H, S, dv), a copy unless v is already rows (4-D) or one block."""
    if v.dim() == 4:
        return v
    B, H, nb, S, width = v.shape
    return v.permute(0, 1, 3, 2, 4).reshape(B, H, S, nb * width)


def native_attention_inputs(qs, ks, v, mask):
    """(q (B, G, Hk, g, dk), k (B, G, Hk, S, dk), v, valid (B, S)) as the native decode attention
    kernels take them, or None when the keys are not laid out for them."""
    B, Hq, _, dk = qs[0].shape
    Hk, S = ks[0].shape[1], ks[0].shape[2]
    k_all = grouped_keys(ks, v)
    if k_all is None:
        return None
    return torch.stack([q.reshape(B, Hk, Hq // Hk, dk) for q in qs], dim=1), k_all, v, mask.reshape(B, S)


def grouped_keys(ks, v):
    """The key tensors of the query groups as one (B, G, Hk, S, dk) view, as the native decode
    attention takes them, or None when they (or v) are not laid out for it."""
    k_all = ks[0].unsqueeze(1) if len(ks) == 1 else _stack_views(ks)
    return k_all if k_all is not None and k_all.stride(-1) == 1 and v.stride(-1) == 1 else None


def _stack_views(ks):
    """ks = consecutive head blocks of one tensor (k[:, :h], k[:, h:]): view them as (B, G, h, S, d)
    without a copy, or None when they are not laid out that way."""
    base = ks[0]
    h = base.shape[1]
    if any(k.shape != base.shape or k.stride() != base.stride() for k in ks):
        return None
    if any(k.data_ptr() - base.data_ptr() != i * h * base.stride(1) * base.element_size()
           for i, k in enumerate(ks)):
        return None
    B, _, S, d = base.shape
    sb, sh, ss, sd = base.stride()
    return base.as_strided((B, len(ks), h, S, d), (sb, h * sh, sh, ss, sd))


def _decode_attention(q, k, v, mask):
    """One query per row: group the query heads that share a key/value head, so K and V are read
    once as they are (no GQA expansion, no copies) by two batched matmuls."""
    B, Hq, _, dk = q.shape
    Hk = k.shape[1]
    qg = q.reshape(B, Hk, Hq // Hk, dk).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(dk))  # (B, Hk, g, S)
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, 1, v.shape[-1]).to(q.dtype)
