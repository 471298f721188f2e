"""What the native-decode tests share: a recording view of the native library, and one ragged
decode (a left-padded prompt, then one-token steps) of a model at a chosen ops level."""

from __future__ import annotations

import torch

from sambay import ops
from sambay.kernels import NativeOps


class Recording:
    """The native library, noting the name of every call of the functions in `names`."""

    def __init__(self, lib, calls: list, names: tuple[str, ...]):
        self._lib, self._calls, self._names = lib, calls, names

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if name not in self._names:
            return fn
        return lambda *a: self._calls.append(name) or fn(*a)


def decoder(model, ids, mask, lib, calls: list):
    """decode(level): the logits and state of prefilling ids[:, :10] (with mask) and then decoding
    one token at a time to the end, with the model's ops at `level` (None: PyTorch's)."""
    def decode(level: str | None):
        calls.clear()
        model.ops = ops.TORCH if level is None else NativeOps(lib, level)
        state = model.new_state(ids.shape[0], ids.shape[1] + 1)
        out = [model(ids[:, :10], attention_mask=mask[:, :10], state=state)]
        # the decode steps on a view of the rows, as the engine makes them (a new view every step)
        out += [model(ids[:, t:t + 1], state=state.rows(slice(0, ids.shape[0]))) for t in range(10, ids.shape[1])]
        return torch.cat(out, 1), state

    return decode
