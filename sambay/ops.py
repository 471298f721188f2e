"""Sequence kernels: the selective scan (Mamba-1) and masked attention.

Each fast function has a small, obviously-right `*_ref` twin with the same signature right beside it;
the tests hold them equal. The fast versions work in chunks so that a long prompt never
materializes a (T x channels x d_state) or (T x T) tensor: their extra memory grows at most
linearly with the sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Selective scan.  Shapes: x, dt (B, T, e); A (e, n); Bm, Cm (B, T, n); D (e,); state (B, e, n).
# All in float32 (the SSM state is always kept in float32).
# ---------------------------------------------------------------------------------------------


def selective_state_step(x, dt, A, Bm, Cm, D, state):
    """One decode step, updating `state` in place. x, dt (B, e); Bm, Cm (B, n). Returns y (B, e).

    s_t = exp(dt A) * s_{t-1} + (dt x) outer B;   y_t = s_t . C + D x
    """
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (B, e, n)
    state.mul_(dA).add_((dt * x).unsqueeze(-1) * Bm.unsqueeze(1))
    return torch.einsum("ben,bn->be", state, Cm) + D * x


def selective_scan_ref(x, dt, A, Bm, Cm, D, state=None):
    """Reference: a plain loop over time. Returns (y (B, T, e), final state (B, e, n))."""
    Bsz, T, e = x.shape
    s = x.new_zeros(Bsz, e, A.shape[1]) if state is None else state
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t, :, None] * A)  # (B, e, n)
        s = dA * s + (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((s * Cm[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, dim=1), s


def selective_scan(x, dt, A, Bm, Cm, D, state=None, chunk: int = 64):
    """Chunked scan: per chunk, the decays and inputs are computed for all steps at once, then one
    fused multiply-add per step carries the state; memory is O(chunk x e x n), not O(T x e x n)."""
    Bsz, T, e = x.shape
    s = x.new_zeros(Bsz, e, A.shape[1]) if state is None else state.clone()
    # In-place updates would break autograd, so training takes the out-of-place variant.
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, dt, A, Bm, Cm, D))
    ys = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        dt_c = dt[:, c0:c1].unsqueeze(-1)  # (B, Lc, e, 1)
        decay = torch.exp(dt_c * A)  # (B, Lc, e, n)
        inputs = dt_c * x[:, c0:c1].unsqueeze(-1) * Bm[:, c0:c1].unsqueeze(2)  # (B, Lc, e, n)
        if differentiable:
            steps = []
            for t in range(c1 - c0):
                s = inputs[:, t] + decay[:, t] * s
                steps.append(s)
            states = torch.stack(steps, dim=1)
        else:  # inference: overwrite the inputs with the states, one fused multiply-add per step
            states = inputs
            for t in range(c1 - c0):
                s = states[:, t].addcmul_(decay[:, t], s)  # s_t = input_t + decay_t * s_{t-1}
        ys.append(torch.einsum("blen,bln->ble", states, Cm[:, c0:c1]))
    y = torch.cat(ys, dim=1) + D * x
    return y, s.clone()


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


def attention(q, k, v, q_pos, k_pos, k_valid, window=None, dropout: float = 0.0):
    """Chunked over queries; each chunk only looks at the key range its positions can reach."""
    Bsz, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    if Tq == 1 and dropout == 0.0:
        return _decode_attention(q, k, v, q_pos, k_pos, k_valid, window)
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


def _decode_attention(q, k, v, q_pos, k_pos, k_valid, window):
    """One query per row: group the query heads that share a key/value head, so K and V are read
    once as they are (no GQA expansion, no copies) by two batched matmuls."""
    B, Hq, _, dk = q.shape
    Hk = k.shape[1]
    qg = q.reshape(B, Hk, Hq // Hk, dk).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(dk))  # (B, Hk, g, S)
    scores.masked_fill_(~attention_mask(q_pos, k_pos, k_valid, window), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, 1, v.shape[-1]).to(q.dtype)
