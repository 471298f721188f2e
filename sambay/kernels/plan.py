"""The decode plan: a prepared SambaY model's decode step as native calls, built from outside.

The model's modules are the reference; this walks them once per decode state's rows and collects,
per layer, what the native blocks read (norms, packed weights, state tensors, constants such as
A = -exp(A_log) and the differential λ). Each step then only recomputes the key sets (the ring
slot, the mask and, for the growing full-attention cache, its view) and makes either one native
call for the whole layer stack (`run`, csrc decode_layers) or one per block from Python
(`run_layers`, the same calls in the same order: the stack's reference).

The records are the native library's typed classes (csrc/kernels.h), built here by field name: a
LayerRecord per layer (its two norms, the MLP's linear layers and a MambaLayer, GmuLayer or
AttentionLayer mixer), from which the library builds its DecodePlan once; per step only the KeySets
are new.
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

MAMBA_KINDS = (MAMBA, MEMORY_MAMBA)
ATTENTION_KINDS = (SWA, KV_ATTENTION, CROSS_ATTENTION)  # cross-attention has no cache of its own to write


def linear_record(lib, lin: nn.Module):
    """The native library's Linear record of a linear layer, or None if it cannot be one: only a
    PackedLinear (the GEMV's layouts) with a float32 bias or none."""
    if type(lin) is not PackedLinear:
        return None
    buf = lin._buffers
    b = buf["bias"]
    if b is not None and b.dtype != torch.float32:
        return None
    return lib.Linear(weight=buf["weight"], scale=buf["weight_scale"], bias=b)


def _linears(lib, *mods: nn.Module) -> list | None:
    recs = [linear_record(lib, m) for m in mods]
    return None if any(r is None for r in recs) else recs


def _norm(lib, ln: nn.Module):
    return lib.Norm(weight=ln.weight, bias=ln.bias, eps=ln.eps)


class KeySource:
    """Where the keys one or more attention layers read this step come from: one of those layers,
    which recomputes them once per step (the ring slot to write, the mask (B, S) and, for caches
    whose view grows, the grouped keys and values) as the library's KeySet."""

    def __init__(self, attn: KVAttention, layer: int, moving: bool):
        self.attn, self.layer, self.moving = attn, layer, moving

    def key_set(self, lib, at: Positions, grouped: list):
        _, _, slot, k_all, v, mask, _ = attention_keys(self.attn, at, self.layer, None, grouped)
        return None if k_all is None else lib.KeySet(slot=slot, valid=mask, keys=k_all, values=v)


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
    full = m.decode_mask(at, k_pos, k_valid)  # one object per step for the layers sharing keys ...
    rows = ("mask rows", id(full))  # ... and so one (B, S) view of it, which identifies their key set
    if rows not in at.memo:
        at.memo[rows] = (full, full.reshape(at.pos.shape[0], -1))  # (holding `full` keeps its id unique)
    mask = at.memo[rows][1]
    return kc, vc, slot, k_all, v, mask, ((k, v, k_pos, k_valid) if not m.cross else shared_kv)


class DecodePlan:
    """What a decode step's native calls read that stays the same from step to step (see the module
    docstring). Built by `build` for one state's rows; rebuilt when the model's packed linear layers
    or their weights were replaced since (quantized, tiled, loaded)."""

    def __init__(self, lib):
        self.lib = lib
        self.layers: list = []  # the library's LayerRecords, in order
        self.native = None  # the library's DecodePlan of them
        self.key_sources: list[KeySource] = []  # AttentionLayer.key_set indexes these
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
            mlp = _linears(lib, layer.mlp.fc1, layer.mlp.fc2)
            if mlp is None or layer.training or ln1.weight.dtype != torch.float32:
                return None
            if layer.kind in MAMBA_KINDS:
                mixer = plan._mamba(m, at, i, memory=layer.kind == MEMORY_MAMBA)
            elif layer.kind == GMU:
                lins = _linears(lib, m.in_proj, m.out_proj)
                mixer = None if lins is None else lib.GmuLayer(in_proj=lins[0], out_proj=lins[1])
            elif layer.kind in ATTENTION_KINDS:
                blk = plan._attention(m, at, i, shared)
                if blk is None:
                    return None
                fields, (mask, k_all), shared, moving = blk
                ident = (id(mask), id(k_all) if moving else None)  # the key set: its mask and, if it moves, keys
                if ident not in sets:
                    if m.cross:  # its keys come from the layer that wrote them, which must come first
                        return None
                    sets[ident] = len(plan.key_sources)
                    plan.key_sources.append(KeySource(m, i, moving))
                mixer = lib.AttentionLayer(**fields, key_set=sets[ident])
            else:
                return None
            if mixer is None:
                return None
            plan.layers.append(lib.LayerRecord(input_norm=_norm(lib, ln1), post_norm=_norm(lib, ln2), fc1=mlp[0],
                                               fc2=mlp[1], mixer=mixer))
        plan.native = lib.DecodePlan(plan.layers)
        return plan

    def _mamba(self, m, at: Positions, layer: int, memory: bool):
        """The MambaLayer record of a Mamba mixer, or None where the native block cannot run it."""
        state = at.state
        if m.D.dtype != torch.float32 or m.conv1d.weight.dtype != torch.float32:
            return None
        lins = _linears(self.lib, m.in_proj, m.x_proj, m.dt_proj, m.out_proj)
        if lins is None or not state.conv[layer].is_contiguous():
            return None
        in_proj, x_proj, dt_proj, out_proj = lins
        return self.lib.MambaLayer(
            in_proj=in_proj, conv_state=state.conv[layer], conv_weight=m.conv1d.weight[:, 0, :],
            conv_bias=m.conv1d.bias, x_proj=x_proj, dt_proj=dt_proj,
            A=-torch.exp(m.A_log.float()),  # the same matrix at every step
            D=m.D, ssm_state=state.ssm[layer], out_proj=out_proj, memory=memory)

    def _attention(self, m, at: Positions, layer: int, shared_kv):
        """(the AttentionLayer record's fields but its key set, the (mask, key view) that identify the
        key set, the K/V the next layers share, whether its key view moves) of an attention layer, or
        None where the native block cannot run it."""
        lins = _linears(self.lib, m.Wqkv, m.out_proj)
        p = m.inner_cross_attn if m.diff else None
        if lins is None or (p is not None and p.subln.weight.dtype != torch.float32):
            return None
        kc, vc, slot, k_all, v, mask, shared = attention_keys(m, at, layer, shared_kv, self.grouped)
        if k_all is None:  # not laid out for the native kernel
            return None
        moving = m.cross or m.window is None or kc.shape[2] == at.state.max_length
        fields = dict(qkv_proj=lins[0], out_proj=lins[1], heads=m.H, k_cache=kc, v_cache=vc,
                      keys=None if moving else k_all, values=None if moving else v)  # else the key set's
        if p is not None:
            fields.update(subln_weight=p.subln.weight, lam=float(p.lam(m.lambda_init)), subln_eps=p.subln.eps,
                          scale=1 - m.lambda_init)
        return fields, (mask, k_all), shared, moving

    def key_sets(self, at: Positions) -> list | None:
        """This step's KeySets: slot, mask, K and V views (the last two unused by a set whose layers
        keep their own, the ring buffers)."""
        out = []
        for source in self.key_sources:
            ks = source.key_set(self.lib, at, self.grouped)
            if ks is None:
                return None
            out.append(ks)
        return out

    def run(self, h: torch.Tensor, at: Positions) -> torch.Tensor | None:
        """The whole layer stack in one native call: h (B, d) -> the residual stream after it."""
        key_sets = self.key_sets(at)
        if key_sets is None:
            return None
        return self.lib.decode_layers(self.native, h, key_sets)

    def run_layers(self, h: torch.Tensor, at: Positions) -> torch.Tensor | None:
        """The same step as `run`, one native block per call from Python (decode_layers' twin)."""
        key_sets = self.key_sets(at)
        if key_sets is None:
            return None
        lib, memory = self.lib, None
        for layer in self.layers:
            x = lib.add_layer_norm(h, EMPTY, layer.input_norm.weight, layer.input_norm.bias, layer.input_norm.eps)[1]
            mixer = layer.mixer
            if isinstance(mixer, lib.MambaLayer):
                mixed, y = lib.mamba_step(x, mixer)
                memory = y if mixer.memory else memory
            elif isinstance(mixer, lib.GmuLayer):
                mixed = lib.gmu_step(x, memory, mixer)
            else:
                mixed = lib.attention_step(x, mixer, key_sets[mixer.key_set])
            h = lib.mlp_step(h, mixed, layer.post_norm, layer.fc1, layer.fc2)
        return h
