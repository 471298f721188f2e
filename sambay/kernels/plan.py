"""The decode plan: a prepared SambaY model's decode step as native calls, built from outside.

The model's modules are the reference; this walks them once per decode state's rows and collects,
per layer, what the native blocks read (norms, packed weights, state tensors, constants such as
A = -exp(A_log) and the differential λ). Each step then only recomputes the key sets (the ring
slot, the mask and, for the growing full-attention cache, its view) and makes either one native
call for the whole layer stack (`run`, csrc decode_layers) or one per block from Python
(`run_layers`, the same calls in the same order: the stack's reference).

The records follow csrc/glue.cpp's decode_layers: per layer {ln1 w, b, ln2 w, b, fc1 (3), fc2 (3),
then the mixer's tensors} and {ln1 eps, ln2 eps, then attention's numbers}; a linear layer is
{weight, scale or empty, bias or empty}.
"""

from __future__ import annotations

import torch
from torch import nn

from sambay.kernels.linear import GEMV_MAX_ROWS, PackedLinear
from sambay.kernels.native import EMPTY
from sambay.models.attention import KVAttention
from sambay.models.config import CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA
from sambay.models.state import Positions
from sambay.ops import grouped_keys

# csrc/glue.cpp's DecodeKind: Mamba, the memory Mamba, GMU, attention (cross-attention has no cache
# of its own to write: empty kc, vc).
KINDS = {MAMBA: 0, MEMORY_MAMBA: 1, GMU: 2, SWA: 3, KV_ATTENTION: 3, CROSS_ATTENTION: 3}
MAMBA_KINDS = (MAMBA, MEMORY_MAMBA)


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return EMPTY if t is None else t


def linear_record(lin: nn.Module) -> list[torch.Tensor] | None:
    """[weight, scale, bias] as the native blocks take a linear layer, or None if it cannot be one:
    only a PackedLinear (the GEMV's layouts) with a float32 bias or none."""
    if type(lin) is not PackedLinear:
        return None
    buf = lin._buffers
    b, s = buf["bias"], buf["weight_scale"]
    if b is not None and b.dtype != torch.float32:
        return None
    return [buf["weight"], _or_empty(s), _or_empty(b)]


def _linears(*mods: nn.Module) -> list[list[torch.Tensor]] | None:
    recs = [linear_record(m) for m in mods]
    return None if any(r is None for r in recs) else recs


class KeySet:
    """The keys one or more attention layers read this step, recomputed once per step by one of them:
    the ring slot to write, the mask (B, S) and, for caches whose view grows, the grouped keys and values."""

    def __init__(self, attn: KVAttention, layer: int, moving: bool):
        self.attn, self.layer, self.moving = attn, layer, moving

    def tensors(self, at: Positions, grouped: list) -> list[torch.Tensor] | None:
        _, _, slot, k_all, v, mask, _ = attention_keys(self.attn, at, self.layer, None, grouped)
        return None if k_all is None else [slot, mask, k_all, v]


def attention_keys(m: KVAttention, at: Positions, layer: int, shared_kv, grouped: list):
    """This step's keys as the native block reads them: the cache and the slot to write (empty for
    cross-attention), the grouped key view (None: not laid out for the kernel), the values, the
    mask (B, S), and the (k, v, k_pos, k_valid) the next layers share. `grouped` keeps (k, view)
    pairs of caches that do not move (ring buffers), so their view is made once per plan."""
    if m.cross:
        k, v, k_pos, k_valid = shared_kv
        kc = vc = slot = EMPTY
    else:
        kc, vc = at.state.k[layer], at.state.v[layer]
        start = at.pos[:, 0]
        if ("slot", kc.shape[2]) not in at.memo:
            at.memo["slot", kc.shape[2]] = torch.remainder(start, kc.shape[2])
        slot = at.memo["slot", kc.shape[2]]
        k, v, k_pos, k_valid = m.cache_view(at, kc, vc, start)
    memo = ("grouped keys", id(k), m.diff)  # the same view for every layer reading k in this call
    hit = at.memo.get(memo)
    k_all = hit[1] if hit is not None and hit[0] is k else next((view for key, view in grouped if key is k), None)
    if k_all is None:
        half = m.Hkv // 2
        k_all = grouped_keys([k[:, :half], k[:, half:]] if m.diff else [k], v)
        if k_all is not None and not m.cross and k is kc:
            grouped.append((k, k_all))
    at.memo[memo] = (k, k_all)
    mask = m.decode_mask(at, k_pos, k_valid).reshape(at.pos.shape[0], -1)
    return kc, vc, slot, k_all, v, mask, ((k, v, k_pos, k_valid) if not m.cross else shared_kv)


class DecodePlan:
    """What a decode step's native calls read that stays the same from step to step (see the module
    docstring). Built by `build` for one state's rows; rebuilt when the model's packed linear layers
    or their weights were replaced since (quantized, tiled, loaded)."""

    def __init__(self, lib):
        self.lib = lib
        self.kinds: list[int] = []
        self.tensors: list[list[torch.Tensor]] = []
        self.scalars: list[list[float]] = []
        self.key_sets: list[KeySet] = []
        self.grouped: list = []  # (cache, grouped view) of the ring buffers
        self.linears: list[tuple[dict, str, PackedLinear, torch.Tensor]] = []

    def current(self, model) -> bool:
        """Whether every packed linear layer and its weight are still those the plan was built with."""
        return all(mods[name] is lin and lin._buffers["weight"] is w for mods, name, lin, w in self.linears)

    @classmethod
    def build(cls, lib, model, at: Positions, rows: int) -> DecodePlan | None:
        """The plan of `model` (a SambaY) for a step of `rows` rows on at.state, or None when some
        layer cannot run as a native block (the layers then run one by one)."""
        if rows > GEMV_MAX_ROWS or not hasattr(model.model, "final_layernorm"):
            return None
        plan, sets, shared = cls(lib), {}, None
        plan.linears = [(parent._modules, name, lin, lin._buffers["weight"]) for parent in model.modules()
                        for name, lin in parent._modules.items() if isinstance(lin, PackedLinear)]
        for layer in model.model.layers:
            ln1, ln2, m, i = layer.input_layernorm, layer.post_attention_layernorm, layer.attn, layer.index
            mlp = _linears(layer.mlp.fc1, layer.mlp.fc2)
            if mlp is None or layer.training or ln1.weight.dtype != torch.float32 or layer.kind not in KINDS:
                return None
            t = [ln1.weight, _or_empty(ln1.bias), ln2.weight, _or_empty(ln2.bias), *mlp[0], *mlp[1]]
            sc = [ln1.eps, ln2.eps]
            if layer.kind in MAMBA_KINDS:
                blk = plan._mamba(m, at, i)
                if blk is None:
                    return None
                t += blk
            elif layer.kind == GMU:
                lins = _linears(m.in_proj, m.out_proj)
                if lins is None:
                    return None
                t += [*lins[0], *lins[1]]
            else:
                blk = plan._attention(m, at, i, shared)
                if blk is None:
                    return None
                tensors, numbers, shared, moving = blk
                ident = (id(numbers.pop()), id(tensors[-1]) if moving else None)  # (mask, keys) of the set
                if ident not in sets:
                    if m.cross:  # its keys come from the layer that wrote them, which must come first
                        return None
                    sets[ident] = len(plan.key_sets)
                    plan.key_sets.append(KeySet(m, i, moving))
                tensors.pop()
                t += tensors
                sc += [*numbers, sets[ident]]
            plan.kinds.append(KINDS[layer.kind])
            plan.tensors.append(t)
            plan.scalars.append(sc)
        return plan

    def _mamba(self, m, at: Positions, layer: int) -> list[torch.Tensor] | None:
        state = at.state
        if m.D.dtype != torch.float32 or m.conv1d.weight.dtype != torch.float32:
            return None
        lins = _linears(m.in_proj, m.x_proj, m.dt_proj, m.out_proj)
        if lins is None or not state.conv[layer].is_contiguous():
            return None
        inp, xp, dtp, outp = lins
        A = -torch.exp(m.A_log.float())  # the same matrix at every step
        return [*inp, state.conv[layer], m.conv1d.weight[:, 0, :], _or_empty(m.conv1d.bias), *xp, *dtp, A, m.D,
                state.ssm[layer], *outp]

    def _attention(self, m, at: Positions, layer: int, shared_kv):
        """(tensors, numbers, the K/V the next layers share, whether its key view moves) of an attention
        layer; the last tensor and number are the key view and mask that identify its key set."""
        lins = _linears(m.Wqkv, m.out_proj)
        p = m.inner_cross_attn if m.diff else None
        if lins is None or (p is not None and p.subln.weight.dtype != torch.float32):
            return None
        qkv, outp = lins
        kc, vc, slot, k_all, v, mask, shared = attention_keys(m, at, layer, shared_kv, self.grouped)
        if k_all is None:  # not laid out for the native kernel
            return None
        if p is not None:
            lam, sub_w, sub_eps, scale = float(p.lam(m.lambda_init)), p.subln.weight, p.subln.eps, 1 - m.lambda_init
        else:
            lam, sub_w, sub_eps, scale = 0.0, EMPTY, 0.0, 1.0
        moving = m.cross or m.window is None or kc.shape[2] == at.state.max_length
        tensors = [*qkv, *outp, kc, vc, EMPTY if moving else k_all, EMPTY if moving else v, sub_w, k_all]
        return tensors, [m.H, lam, sub_eps, scale, mask], shared, moving

    def keys(self, at: Positions) -> list[list[torch.Tensor]] | None:
        """This step's key sets: slot, mask, K and V views (the last two unused by a set whose
        layers keep their own, the ring buffers)."""
        out = []
        for ks in self.key_sets:
            t = ks.tensors(at, self.grouped)
            if t is None:
                return None
            out.append(t)
        return out

    def run(self, h: torch.Tensor, at: Positions) -> torch.Tensor | None:
        """The whole layer stack in one native call: h (B, d) -> the residual stream after it."""
        keys = self.keys(at)
        if keys is None:
            return None
        return self.lib.decode_layers(h, self.kinds, self.tensors, self.scalars, keys)

    def run_layers(self, h: torch.Tensor, at: Positions) -> torch.Tensor | None:
        """The same step as `run`, one native block per call from Python (decode_layers' twin)."""
        keys = self.keys(at)
        if keys is None:
            return None
        lib, memory = self.lib, None
        for kind, t, s in zip(self.kinds, self.tensors, self.scalars):
            x = lib.add_layer_norm(h, EMPTY, t[0], t[1], s[0])[1]
            if kind in (0, 1):
                mixed, y = lib.mamba_step(x, t[10:13], t[13], t[14], t[15], t[16:19], t[19:22], t[22], t[23],
                                          t[24], t[25:28])
                memory = y if kind == 1 else memory
            elif kind == 2:
                mixed = lib.gmu_step(x, memory, t[10:13], t[13:16])
            else:
                slot, mask, k_all, v = keys[int(s[6])]
                own, writes = t[18].numel() > 0, t[16].numel() > 0
                mixed = lib.attention_step(x, t[10:13], int(s[2]), t[16], t[17], slot if writes else EMPTY,
                                           t[18] if own else k_all, t[19] if own else v, mask, s[3], t[20], s[4],
                                           s[5], t[13:16])
            h = lib.mlp_step(h, mixed, t[2], t[3], s[1], t[4:7], t[7:10])
        return h
