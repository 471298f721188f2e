"""What a decode carries between calls: the positions of a call's tokens (`Positions`) and the
preallocated per-layer state of a batch of sequences (`DecodeState`).

Each layer reads and writes only its own entries of the state; the engine alone advances positions
(`CausalLM.forward` claims them). Both model families use the same state object.
"""

from __future__ import annotations

import copy

import torch

from sambay.ops import TORCH, Ops


class Positions:
    """Where the current tokens sit: absolute positions (B, T) and which are real (not padding), the
    decode state they extend (or None) and the model's operations (`ops`, see sambay.ops.Ops).

    `memo` holds what every layer of a kind would otherwise recompute within one forward call
    (ring-buffer positions, attention masks); it lives exactly as long as the call.
    """

    def __init__(self, pos: torch.Tensor, valid: torch.Tensor, state: DecodeState | None, ops: Ops = TORCH):
        self.pos, self.valid, self.state, self.ops = pos, valid, state, ops
        self.padded = not bool(valid.all())
        self.memo: dict = {}

    def select(self, keep: int) -> Positions:
        return Positions(self.pos[:, -keep:], self.valid[:, -keep:], self.state, self.ops)


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

    def __init__(self, model, batch_size: int, max_length: int):
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
        # What a model's operations derive from these tensors and reuse at every step (the native
        # decode plan), keyed by (ops, rows_key); shared with the row views, dropped with the state.
        self.derived: dict = {}
        self.rows_key: tuple = ()  # which rows of the parent state this view holds

    def rows(self, index: int | slice) -> DecodeState:
        """A view of some rows: writing through it writes into this state (no copies)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        view = copy.copy(self)
        for name in ("conv", "ssm", "k", "v"):
            setattr(view, name, [None if t is None else t[index] for t in getattr(self, name)])
        view.valid, view.lengths = self.valid[index], self.lengths[index]
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

    def snapshot_row(self, row: int) -> dict:
        """Copies of what row `row` holds, enough to put a row back in this condition (`restore_row`,
        the prefix cache): conv and SSM states whole, the K/V slots holding positions (a ring keeps
        its layout, slot = position % slots), the validity of its positions and its length."""
        used = int(self.lengths[row])
        snap = {name: [None if t is None else t[row].clone() for t in getattr(self, name)]
                for name in ("conv", "ssm")}
        for name in ("k", "v"):
            snap[name] = [None if t is None else t[row][..., :min(used, t.shape[-2]), :].clone()
                          for t in getattr(self, name)]
        snap["slots"] = [None if t is None else t.shape[-2] for t in self.k]
        snap["valid"], snap["length"] = self.valid[row, :used].clone(), used
        return snap

    def can_restore(self, snap: dict) -> bool:
        """Whether `snap` (from a state of the same model) fits these rows: room for its positions,
        and each K/V buffer as many slots wide, or all its positions within both rings' first lap."""
        used = snap["length"]
        if used > self.max_length or len(snap["slots"]) != len(self.k):
            return False
        for t, slots in zip(self.k, snap["slots"]):
            if (t is None) != (slots is None):
                return False
            if t is not None and t.shape[-2] != slots and used > min(slots, t.shape[-2]):
                return False
        return True

    def restore_row(self, row: int, snap: dict) -> None:
        """Put row `row` in the condition `snap` was taken in (check `can_restore` first)."""
        for t, s in zip(self.conv + self.ssm, snap["conv"] + snap["ssm"]):
            if t is not None:
                t[row].copy_(s)
        for t, s in zip(self.k + self.v, snap["k"] + snap["v"]):
            if t is not None:
                t[row][..., :s.shape[-2], :].copy_(s)
        used = snap["length"]
        self.valid[row].zero_()
        self.valid[row, :used] = snap["valid"]
        self.lengths[row] = used

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
