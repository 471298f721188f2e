"""The decode plan: a prepared model's decode step as native calls, built from outside.

The model's modules are the reference; this walks them once per decode state's rows and collects,
per layer, what the native blocks read (norms, packed weights, state tensors, constants such as
A = -exp(A_log) and the differential λ). Each step then only recomputes the key sets (the ring
slot, the mask and, for the growing full-attention cache, its view) and makes either one native
call for the whole layer stack (`run`, csrc decode_layers) or one per block from Python
(`run_layers`, the same calls in the same order: the stack's reference).

The records are the native library's typed classes (csrc/kernels.h), built here by field name: a
LayerRecord per layer (its two norms, the MLP's linear layers and a MambaLayer, GmuLayer or
AttentionLayer mixer), from which the library builds its DecodePlan once; per step only the KeySets
are new. One builder per family: SambaY's layers (LayerNorms, Mamba / GMU / differential attention)
and the Phi3 baseline's (RMSNorms, GQA self-attention with RoPE, whose cos/sin at each row's position
the key sets carry, computed per step by the model's own RotaryEmbedding), so both architectures
decode through the same blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from sambay.kernels.linear import GEMV_MAX_ROWS, PackedLinear
from sambay.kernels.native import EMPTY
from sambay.models.attention import KVAttention
from sambay.models.config import CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA
from sambay.models.phi3 import Phi3
from sambay.models.sambay import SambaY
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


def _rms_norm(lib, ln: nn.Module):
    """Phi3's RMSNorm (normalize in float32, then scale: its input is float32 in a packed model)."""
    return lib.Norm(weight=ln.weight, bias=None, eps=ln.eps, rms=True)


def rope_tables(rope: tuple, at: Positions):
    """cos, sin (B, rotary_dim) float32 of this step's positions, made once per step by the model's
    RotaryEmbedding in the model's dtype, as its forward rotates q and k (so the same values)."""
    if "rope rows" not in at.memo:
        emb, dtype = rope
        cos, sin = emb(at.pos, dtype)  # (B, 1, r)
        B = at.pos.shape[0]
        at.memo["rope rows"] = (cos.reshape(B, -1).float(), sin.reshape(B, -1).float())
    return at.memo["rope rows"]


class KeySource:
    """Where the keys one or more attention layers read this step come from: one of those layers,
    which recomputes them once per step (the ring slot to write, the mask (B, S) and, for caches
    whose view grows, the grouped keys and values) as the library's KeySet."""

    def __init__(self, attn: KVAttention, layer: int, moving: bool, rope: tuple | None = None):
        self.attn, self.layer, self.moving = attn, layer, moving
        self.rope = rope  # (RotaryEmbedding, dtype) of a Phi3 model: the key set carries cos/sin

    def key_set(self, lib, at: Positions, grouped: list):
        _, _, slot, k_all, v, mask, _ = attention_keys(self.attn, at, self.layer, None, grouped)
        if k_all is None:
            return None
        cos, sin = (None, None) if self.rope is None else rope_tables(self.rope, at)
        return lib.KeySet(slot=slot, valid=mask, keys=k_all, values=v, cos=cos, sin=sin)


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
        self._sets: dict = {}  # (mask id, key view id if it moves) -> index in key_sources

    def current(self, model) -> bool:
        """Whether every packed linear layer and its weight are still those the plan was built with."""
        return all(mods[name] is lin and lin._buffers["weight"] is w for mods, name, lin, w in self.linears)

    @classmethod
    def build(cls, lib, model, at: Positions, rows: int) -> DecodePlan | None:
        """The plan of `model` (a SambaY or a Phi3) for a step of `rows` rows on at.state, or None when
        some layer cannot run as a native block (the layers then run one by one)."""
        family = cls._phi3_layers if isinstance(model, Phi3) else cls._sambay_layers if isinstance(model, SambaY) else None
        if rows > GEMV_MAX_ROWS or family is None or any(layer.training for layer in model.model.layers):
            return None
        plan = cls(lib)
        plan.linears = [(parent._modules, name, lin, lin._buffers["weight"]) for parent in model.modules()
                        for name, lin in parent._modules.items() if isinstance(lin, PackedLinear)]
        layers = family(plan, model, at)
        if layers is None:
            return None
        plan.layers = layers
        plan.native = lib.DecodePlan(plan.layers)
        return plan

    def _sambay_layers(self, model, at: Positions) -> list | None:
        """SambaY's LayerRecords: LayerNorms, fc1/fc2, and a Mamba, GMU or attention mixer."""
        lib, shared, out = self.lib, None, []
        for layer in model.model.layers:
            ln1, ln2, m, i = layer.input_layernorm, layer.post_attention_layernorm, layer.attn, layer.index
            mlp = _linears(lib, layer.mlp.fc1, layer.mlp.fc2)
            if mlp is None or ln1.weight.dtype != torch.float32:
                return None
            if layer.kind in MAMBA_KINDS:
                mixer = self._mamba(m, at, i, memory=layer.kind == MEMORY_MAMBA)
            elif layer.kind == GMU:
                lins = _linears(lib, m.in_proj, m.out_proj)
                mixer = None if lins is None else lib.GmuLayer(in_proj=lins[0], out_proj=lins[1])
            elif layer.kind in ATTENTION_KINDS:
                blk = self._attention(m, at, i, shared, _linears(lib, m.Wqkv, m.out_proj))
                if blk is None:
                    return None
                fields, (mask, k_all), shared, moving = blk
                key_set = self._key_set(m, i, mask, k_all, moving)
                mixer = None if key_set is None else lib.AttentionLayer(**fields, key_set=key_set)
            else:
                return None
            if mixer is None:
                return None
            out.append(lib.LayerRecord(input_norm=_norm(lib, ln1), post_norm=_norm(lib, ln2), fc1=mlp[0],
                                       fc2=mlp[1], mixer=mixer))
        return out

    def _phi3_layers(self, model, at: Positions) -> list | None:
        """Phi3's LayerRecords: RMSNorms, gate_up_proj/down_proj (the same SwiGLU block as SambaY's
        fc1/fc2), and GQA self-attention rotating q and k by the key set's cos/sin."""
        lib, out = self.lib, []
        rope = (model.model.rotary_emb, model.dtype)  # the dtype its forward makes the tables in
        for layer in model.model.layers:
            ln1, ln2, m, i = layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, layer.index
            mlp = _linears(lib, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if mlp is None or ln1.weight.dtype != torch.float32 or ln2.weight.dtype != torch.float32:
                return None
            blk = self._attention(m, at, i, None, _linears(lib, m.qkv_proj, m.o_proj))
            if blk is None:
                return None
            fields, (mask, k_all), _, moving = blk
            key_set = self._key_set(m, i, mask, k_all, moving, rope)
            mixer = lib.AttentionLayer(**fields, key_set=key_set, rotary_dim=model.model.rotary_emb.dim)
            out.append(lib.LayerRecord(input_norm=_rms_norm(lib, ln1), post_norm=_rms_norm(lib, ln2), fc1=mlp[0],
                                       fc2=mlp[1], mixer=mixer))
        return out

    def _key_set(self, m, layer: int, mask, k_all, moving: bool, rope: tuple | None = None) -> int | None:
        """The index of the key set an attention layer reads (its mask and, if its keys move, the key
        view identify it), registered on first use; None for a cross-attention layer coming first."""
        ident = (id(mask), id(k_all) if moving else None)
        if ident not in self._sets:
            if m.cross:  # its keys come from the layer that wrote them, which must come first
                return None
            self._sets[ident] = len(self.key_sources)
            self.key_sources.append(KeySource(m, layer, moving, rope))
        return self._sets[ident]

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

    def _attention(self, m, at: Positions, layer: int, shared_kv, lins: list | None):
        """(the AttentionLayer record's fields but its key set, the (mask, key view) that identify the
        key set, the K/V the next layers share, whether its key view moves) of an attention layer
        whose qkv and output projections' records are `lins`, or None where the native block cannot
        run it."""
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
            x = lib.norm_step(h, EMPTY, layer.input_norm)[1]
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
