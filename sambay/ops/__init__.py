"""Sequence kernels: the selective scan (Mamba-1) and masked attention, and the fused glue of a
decode step (norms, gates, the conv window, the K/V cache write).

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
    The native kernel makes one pass over the state; `selective_state_step_ref` is its twin."""
    from sambay.kernels import native as kernels

    y = kernels.ssm_step(x, dt, A, Bm, Cm, D, state)
    return y if y is not None else selective_state_step_ref(x, dt, A, Bm, Cm, D, state)


def selective_state_step_ref(x, dt, A, Bm, Cm, D, state):
    """s_t = exp(dt A) * s_{t-1} + (dt x) outer B;   y_t = s_t . C + D x   (state updated in place)"""
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
    fused multiply-add per step carries the state; memory is O(chunk x e x n), not O(T x e x n).
    Differentiable through `_ScanFunction`, whose backward recomputes each chunk's states."""
    s0 = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if state is None else state
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, Bm, Cm, D, s0)):
        return _ScanFunction.apply(x, dt, A, Bm, Cm, D, s0, chunk)
    y, s, _ = _scan_forward(x, dt, A, Bm, Cm, D, s0, chunk)
    return y, s


def _chunk_states(x, dt, A, Bm, s, c0, c1):
    """States s_t for t in [c0, c1) given s_{c0-1} = s, plus the per-step decays. (B, Lc, e, n)."""
    dt_c = dt[:, c0:c1].unsqueeze(-1)  # (B, Lc, e, 1)
    decay = torch.exp(dt_c * A)  # (B, Lc, e, n)
    states = dt_c * x[:, c0:c1].unsqueeze(-1) * Bm[:, c0:c1].unsqueeze(2)  # inputs, then states
    for t in range(c1 - c0):
        s = states[:, t].addcmul_(decay[:, t], s)  # s_t = input_t + decay_t * s_{t-1}
    return states, decay


def _scan_forward(x, dt, A, Bm, Cm, D, s0, chunk):
    T = x.shape[1]
    s, ys, starts = s0, [], []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        starts.append(s)
        states, _ = _chunk_states(x, dt, A, Bm, s, c0, c1)
        ys.append(torch.einsum("blen,bln->ble", states, Cm[:, c0:c1]))
        s = states[:, -1].clone()
    return torch.cat(ys, dim=1) + D * x, s, starts


class _ScanFunction(torch.autograd.Function):
    """Selective scan with a hand-written backward: saves only each chunk's starting state.

    Forward  s_t = a_t * s_{t-1} + b_t,  a_t = exp(dt_t A),  b_t = dt_t x_t B_t,  y_t = C_t . s_t + D x_t
    Backward g_t = C_t gy_t + a_{t+1} * g_{t+1} (g = dL/ds_t), run backwards per chunk; then
    dL/da_t = g_t * s_{t-1}, dL/db_t = g_t, dL/dC_t = sum_e gy_t s_t, and the chain rule through
    a_t and b_t to dt, x, A, B.
    """

    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, D, s0, chunk):
        y, s, starts = _scan_forward(x, dt, A, Bm, Cm, D, s0, chunk)
        ctx.save_for_backward(x, dt, A, Bm, Cm, D, *starts)
        ctx.chunk = chunk
        return y, s

    @staticmethod
    def backward(ctx, gy, gs_final):
        x, dt, A, Bm, Cm, D, *starts = ctx.saved_tensors
        chunk, T = ctx.chunk, x.shape[1]
        gx, gdt = torch.zeros_like(x), torch.zeros_like(dt)
        gB, gC = torch.zeros_like(Bm), torch.zeros_like(Cm)
        gA = torch.zeros_like(A)
        g = gs_final.clone() if gs_final is not None else torch.zeros_like(starts[0])
        next_decay = None  # a_{c1} of the chunk after this one
        for ci in reversed(range(len(starts))):
            c0 = ci * chunk
            c1 = min(T, c0 + chunk)
            s_prev0 = starts[ci]
            states, decay = _chunk_states(x, dt, A, Bm, s_prev0.clone(), c0, c1)
            gy_c, C_c = gy[:, c0:c1], Cm[:, c0:c1]
            gC[:, c0:c1] = torch.einsum("ble,blen->bln", gy_c, states)
            # dL/ds_t for every t of the chunk, walking backwards; carried in `g`.
            gstates = gy_c.unsqueeze(-1) * C_c.unsqueeze(2)  # (B, Lc, e, n): direct terms
            for t in reversed(range(c1 - c0)):
                if next_decay is not None:
                    g = gstates[:, t].addcmul_(next_decay, g)
                else:
                    g = gstates[:, t].add_(g)
                next_decay = decay[:, t]
            prev = torch.cat([s_prev0.unsqueeze(1), states[:, :-1]], dim=1)  # s_{t-1}
            g_logdecay = gstates * prev * decay  # dL/d(dt A)
            dt_c, x_c, B_c = dt[:, c0:c1], x[:, c0:c1], Bm[:, c0:c1]
            gdt[:, c0:c1] = torch.einsum("blen,en->ble", g_logdecay, A)
            gA += torch.einsum("blen,ble->en", g_logdecay, dt_c)
            gb_B = torch.einsum("blen,bln->ble", gstates, B_c)  # sum_n g_t B_t
            gdt[:, c0:c1] += gb_B * x_c
            gx[:, c0:c1] = gb_B * dt_c
            gB[:, c0:c1] = torch.einsum("blen,ble->bln", gstates, dt_c * x_c)
            g = g.clone()  # dL/ds_{c0}: carried into the previous chunk (with its decay a_{c0})
        # g now holds dL/ds_0 contribution from step 0's direct term; the start state's gradient:
        gs0 = next_decay * g
        gx += gy * D
        gD = (gy * x).sum(dim=(0, 1))
        return gx, gdt, gA, gB, gC, gD, gs0, None


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
    The native kernel streams K and V once for all groups; the fallback is `_decode_attention`."""
    from sambay.kernels import native as kernels

    B, Hq = qs[0].shape[:2]
    native = _native_attention_inputs(qs, ks, v, mask)
    out = None if native is None else kernels.decode_attention(*native)
    if out is None:
        return torch.stack([_decode_attention(q, k, v, mask)[:, :, 0] for q, k in zip(qs, ks)], dim=1)
    return out.reshape(B, len(qs), Hq, v.shape[-1]).to(qs[0].dtype)


def decode_diff_attention(qs, ks, v, mask, lam: float):
    """Differential attention's two groups for one query per row, already combined:
    softmax(q1 k1) V - lam softmax(q2 k2) V as (B, 1, Hq, dv) float32, arguments as
    decode_attention_groups takes them, except that v may be in column blocks (value_rows).
    The native kernel weighs each value row once for both groups; the reference computes the
    groups (decode_attention_stacked) and subtracts."""
    from sambay.kernels import native as kernels

    B, Hq = qs[0].shape[:2]
    native = _native_attention_inputs(qs, ks, v, mask)
    out = None if native is None else kernels.decode_diff_attention(*native, lam)
    if out is None:
        return decode_diff_attention_ref(qs, ks, v, mask, lam)
    return out.reshape(B, 1, Hq, out.shape[-1])


def decode_diff_attention_ref(qs, ks, v, mask, lam: float):
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


def _native_attention_inputs(qs, ks, v, mask):
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


# ---------------------------------------------------------------------------------------------
# Decode glue: the small vector operations between a decode step's matrix products, fused
# natively (csrc/glue.cpp) when the kernels are built, no gradient is wanted and the tensors are
# float32 (states may be bfloat16); otherwise the `*_ref` twin runs. Rows: (R, n) views whose
# last dimension is contiguous.
# ---------------------------------------------------------------------------------------------


def _glue(*tensors):
    from sambay.kernels import native as kernels

    mod = kernels.glue()
    if mod is None or any(t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors):
        return None
    return mod


def add_layer_norm(h, delta, weight, bias, eps: float):
    """(h + delta, layer_norm(h + delta)) for h, delta (R, d); delta None: (h, layer_norm(h))."""
    f32 = h.dtype == weight.dtype == torch.float32 and (delta is None or delta.dtype == torch.float32)
    mod = _glue(h, *(() if delta is None else (delta,))) if f32 and h.dim() == 2 else None
    if mod is None or (bias is not None and bias.dtype != torch.float32):
        return add_layer_norm_ref(h, delta, weight, bias, eps)
    h2, out = mod.add_layer_norm(h, delta if delta is not None else h.new_empty(0), weight,
                                 bias if bias is not None else h.new_empty(0), eps)
    return h2, out


def add_layer_norm_ref(h, delta, weight, bias, eps: float):
    h = h if delta is None else h + delta
    return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def silu_mul(a, b):
    """silu(a) * b, for a and b of the same shape (any number of leading dims)."""
    if a.dtype == b.dtype == torch.float32 and a.shape == b.shape and a.dim() >= 2:
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        mod = _glue(a2, b2)
        if mod is not None:
            return mod.silu_mul(a2, b2).view(a.shape)
    return silu_mul_ref(a, b)


def silu_mul_ref(a, b):
    return F.silu(a) * b


def conv_step(x, state, weight, bias):
    """Mamba's causal depthwise conv for one new input per row, then silu. x (B, e); state
    (B, k-1, e) holds the previous inputs (oldest first) and is shifted in place to take x;
    weight (e, k); bias (e,) or None. Returns (B, e) in x's dtype."""
    if x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        mod = _glue(x, state)
        if mod is not None and state.is_contiguous():
            return mod.conv_step(x, state, weight, bias if bias is not None else x.new_empty(0))
    return conv_step_ref(x, state, weight, bias)


def conv_step_ref(x, state, weight, bias):
    window = torch.cat([state.to(x.dtype), x.unsqueeze(1)], dim=1)  # (B, k, e)
    state.copy_(window[:, 1:])
    out = sum(window[:, j] * weight[:, j] for j in range(weight.shape[1]))
    return F.silu(out + bias if bias is not None else out)


def diff_combine(o, lam: float, weight, eps: float, scale: float):
    """Differential attention's output for one query per row: o (B, 2, Hk, g, dv) holds the
    attention of the q1 and q2 heads; returns rms_norm(o1 - lam * o2) * weight * scale as
    (B, Hk * g * dv), heads in order. o (B, 1, Hk, g, dv) is o1 - lam * o2 already
    (decode_diff_attention's result)."""
    mod = _glue(o) if o.dtype == weight.dtype == torch.float32 else None
    if mod is None:
        return diff_combine_ref(o, lam, weight, eps, scale)
    return mod.diff_combine(o, lam, weight, eps, scale)


def diff_combine_ref(o, lam: float, weight, eps: float, scale: float):
    o = o.float()
    mixed = o[:, 0] - lam * o[:, 1] if o.shape[1] == 2 else o[:, 0]
    out = F.rms_norm(mixed, (o.shape[-1],), weight.float(), eps) * scale
    return out.reshape(o.shape[0], -1)


def kv_write(kv, kc, vc, slot, diff: bool):
    """Write one new position per row into a K/V cache. kv (B, 2 * Hkv * hd): the projected keys
    then values; kc (B, Hkv, S, hd), vc (B, Hv, S, dv) with Hv * dv = Hkv * hd, or vc in column
    blocks (B, Hv, nb, S, dv / nb) (value_blocks); slot (B,) int64.
    diff: key heads are stored [even..., odd...] (differential attention's cache layout)."""
    mod = _glue(kv, kc, vc) if kv.dtype == torch.float32 and kv.dim() == 2 else None
    if mod is None or kc.dtype not in (torch.float32, torch.bfloat16):
        return kv_write_ref(kv, kc, vc, slot, diff)
    mod.kv_write(kv, kc, vc, slot, diff)


def kv_write_ref(kv, kc, vc, slot, diff: bool):
    B, Hkv, _, hd = kc.shape
    k = kv[:, : Hkv * hd].reshape(B, Hkv, hd)
    if diff:
        k = torch.cat([k[:, 0::2], k[:, 1::2]], dim=1)
    v = kv[:, Hkv * hd:].reshape(vc.shape[:-2] + vc.shape[-1:])  # (B, Hv, [nb,] width)
    rows = torch.arange(B, device=kc.device)
    kc[rows, :, slot] = k.to(kc.dtype)
    vc[rows, ..., slot, :] = v.to(vc.dtype)
