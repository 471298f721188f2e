"""Native kernels behind the models' operations: `NativeOps` is what a prepared model's layers call.

A model holds an `Ops` object (sambay.ops): PyTorch by default. `prepare_for_inference` gives it a
`NativeOps` instead, which runs the same operations with the native kernels where they apply (CPU,
no gradient wanted, float32 activations, suitable layouts) and falls back to the PyTorch versions
otherwise, so the result never depends on which one ran beyond rounding. Three levels, chosen per
model (the tests decode all three ways and hold them equal to the PyTorch reference):

    "ops"     each operation native, the layers still run one by one from Python;
    "layers"  a decode step as one native call per layer (DecodePlan.run_layers), from Python;
    "stack"   a decode step's whole layer stack in one native call (DecodePlan.run) - the default.
"""

from __future__ import annotations

import torch

from sambay.kernels import native
from sambay.kernels.plan import DecodePlan
from sambay.ops import Ops
from sambay.ops.attend import native_attention_inputs

LEVELS = ("ops", "layers", "stack")


def _rows(*tensors) -> bool:
    """Whether the glue kernels take these tensors: on the CPU, last dimension contiguous."""
    return all(t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)


class NativeOps(Ops):
    """The decode-time operations with native kernels (csrc/), each falling back to PyTorch's."""

    name = "native"

    def __init__(self, lib, level: str = "stack"):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.lib, self.level = lib, level

    def _usable(self) -> bool:
        return not torch.is_grad_enabled()

    # ---- sequence kernels -------------------------------------------------------------------------
    def selective_state_step(self, x, dt, A, Bm, Cm, D, state):
        if (self._usable() and state.device.type == "cpu" and state.is_contiguous()
                and all(t.dtype == torch.float32 for t in (x, dt, A, Bm, Cm, D, state))):
            return self.lib.ssm_step(x, dt, A, Bm, Cm, D, state)
        return super().selective_state_step(x, dt, A, Bm, Cm, D, state)

    def decode_attention(self, qs, ks, v, mask):
        inputs = native_attention_inputs(qs, ks, v, mask) if self._usable() else None
        if inputs is None or qs[0].device.type != "cpu":
            return super().decode_attention(qs, ks, v, mask)
        B, Hq = qs[0].shape[:2]
        q, k, vv, valid = inputs
        out = self.lib.decode_attention(q.float(), k, vv, valid)
        return out.reshape(B, len(qs), Hq, v.shape[-1]).to(qs[0].dtype)

    def decode_diff_attention(self, qs, ks, v, mask, lam: float):
        inputs = native_attention_inputs(qs, ks, v, mask) if self._usable() else None
        if inputs is None or qs[0].device.type != "cpu":
            return super().decode_diff_attention(qs, ks, v, mask, lam)
        B, Hq = qs[0].shape[:2]
        q, k, vv, valid = inputs
        out = self.lib.decode_diff_attention(q.float(), k, vv, valid, lam)
        return out.reshape(B, 1, Hq, out.shape[-1])

    # ---- decode glue ------------------------------------------------------------------------------
    def add_layer_norm(self, h, delta, weight, bias, eps: float):
        f32 = h.dtype == weight.dtype == torch.float32 and (delta is None or delta.dtype == torch.float32)
        if (f32 and h.dim() == 2 and self._usable() and _rows(h, *(() if delta is None else (delta,)))
                and (bias is None or bias.dtype == torch.float32)):
            h2, out = self.lib.add_layer_norm(h, native.EMPTY if delta is None else delta, weight,
                                              native.EMPTY if bias is None else bias, eps)
            return h2, out
        return super().add_layer_norm(h, delta, weight, bias, eps)

    def silu_mul(self, a, b):
        if a.dtype == b.dtype == torch.float32 and a.shape == b.shape and a.dim() >= 2 and self._usable():
            a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            if _rows(a2, b2):
                return self.lib.silu_mul(a2, b2).view(a.shape)
        return super().silu_mul(a, b)

    def conv_step(self, x, state, weight, bias):
        if (x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
                and self._usable() and _rows(x, state) and state.is_contiguous()):
            return self.lib.conv_step(x, state, weight, native.EMPTY if bias is None else bias)
        return super().conv_step(x, state, weight, bias)

    def diff_combine(self, o, lam: float, weight, eps: float, scale: float):
        if o.dtype == weight.dtype == torch.float32 and self._usable() and _rows(o):
            return self.lib.diff_combine(o, lam, weight, eps, scale)
        return super().diff_combine(o, lam, weight, eps, scale)

    def kv_write(self, kv, kc, vc, slot, diff: bool):
        if (kv.dtype == torch.float32 and kv.dim() == 2 and kc.dtype in (torch.float32, torch.bfloat16)
                and self._usable() and _rows(kv, kc, vc)):
            self.lib.kv_write(kv, kc, vc, slot, diff)
            return
        super().kv_write(kv, kc, vc, slot, diff)

    # ---- whole steps ------------------------------------------------------------------------------
    def decode_step(self, model, h, at):
        """A decode step through the model's DecodePlan ("layers" or "stack"), or None where the
        plan does not apply (padding in this call, a layer the blocks cannot run, autograd)."""
        if self.level == "ops" or at.padded or h.dtype != torch.float32 or not self._usable():
            return None
        state = at.state
        key = (self, state.rows_key)
        plan = state.derived.get(key)
        if plan is None or (plan is not False and not plan.current(model)):
            plan = state.derived[key] = DecodePlan.build(self.lib, model, at, h.shape[0]) or False
        if plan is False:
            return None
        B, _, d = h.shape
        run = plan.run if self.level == "stack" else plan.run_layers
        out = run(h.reshape(B, d), at)
        return None if out is None else out.view(B, 1, d)
