"""The operations the models' layers are made of, in PyTorch: the selective scan, attention with
explicit positions, and the glue of a decode step. Each fast path has its reference beside it.

A model calls the decode-time operations through its `Ops` object (`model.ops`), so that native
kernels can be given to one model from outside (sambay.kernels.NativeOps, when the model is prepared
for inference) without the model knowing about them, and without any module-global switch.
"""

from __future__ import annotations

from sambay.ops import attend as _attention, glue as _glue, scan as _scan
from sambay.ops.attend import (attention, attention_mask, attention_ref, decode_attention_groups,
                                  decode_attention_stacked, decode_diff_attention, grouped_keys,
                                  native_attention_inputs, value_blocks, value_rows)
from sambay.ops.glue import add_layer_norm, conv_step, diff_combine, kv_write, silu_mul
from sambay.ops.scan import selective_scan, selective_scan_ref, selective_state_step


class Ops:
    """The decode-time operations of a model, in PyTorch (every model starts with these).

    A subclass may replace any of them with a faster version of the same contract, and may run a
    whole decode step of a model at once (`decode_step`); the PyTorch versions are the references
    the tests hold such a subclass to.
    """

    name = "pytorch"

    def selective_state_step(self, x, dt, A, Bm, Cm, D, state):
        return _scan.selective_state_step(x, dt, A, Bm, Cm, D, state)

    def decode_attention(self, qs, ks, v, mask):
        """One query per row, several query groups over shared values: (B, G, Hq, dv)."""
        return _attention.decode_attention_stacked(qs, ks, v, mask)

    def decode_diff_attention(self, qs, ks, v, mask, lam: float):
        return _attention.decode_diff_attention(qs, ks, v, mask, lam)

    def add_layer_norm(self, h, delta, weight, bias, eps: float):
        return _glue.add_layer_norm(h, delta, weight, bias, eps)

    def silu_mul(self, a, b):
        return _glue.silu_mul(a, b)

    def conv_step(self, x, state, weight, bias):
        return _glue.conv_step(x, state, weight, bias)

    def diff_combine(self, o, lam: float, weight, eps: float, scale: float):
        return _glue.diff_combine(o, lam, weight, eps, scale)

    def kv_write(self, kv, kc, vc, slot, diff: bool):
        return _glue.kv_write(kv, kc, vc, slot, diff)

    def decode_step(self, model, h, at):
        """A whole decode step of `model`'s layers at once, or None: run the layers one by one.
        h (B, 1, d) float32 residual stream; returns it after the last layer (before the final norm)."""
        return None


TORCH = Ops()  # stateless: every model can share it

__all__ = ["Ops", "TORCH", "add_layer_norm", "attention", "attention_mask", "attention_ref", "conv_step",
           "decode_attention_groups", "decode_attention_stacked", "decode_diff_attention", "diff_combine",
           "grouped_keys", "kv_write", "native_attention_inputs", "selective_scan", "selective_scan_ref",
           "selective_state_step", "silu_mul", "value_blocks", "value_rows"]
