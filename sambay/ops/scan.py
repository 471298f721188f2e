"""The selective scan of Mamba-1: a chunked, differentiable scan for prompts and training, one step
for decoding, and `selective_scan_ref`, the plain loop over time both are held equal to.

The chunked scan never materializes a (T x channels x d_state) tensor: its extra memory is
O(chunk x e x n), so a long prompt costs memory linear in its length.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# Selective scan.  Shapes: x, dt (B, T, e); A (e, n); Bm, Cm (B, T, n); D (e,); state (B, e, n).
# All in float32 (the SSM state is always kept in float32).
# ---------------------------------------------------------------------------------------------


def selective_state_step(x, dt, A, Bm, Cm, D, state):
    """One decode step, updating `state` in place. x, dt (B, e); Bm, Cm (B, n). Returns y (B, e).
    s_t = exp(dt A) * s_{t-1} + (dt x) outer B;   y_t = s_t . C + D x. Small enough to be its own
    reference; the native kernel (kernels.NativeOps) makes one pass over the state instead."""
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


