"""The SambaY model configuration: one dataclass that reads and writes Hugging Face `config.json`.

The field names are the keys of Phi-4-mini-flash-reasoning's `config.json`, so a config read from a
checkpoint and written back is the same file (unknown keys such as `auto_map` are kept in `extra`).
Everything else about the network, above all the per-layer layout, is derived from these fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import SambayError

ARCHITECTURE = "Phi4FlashForCausalLM"
MODEL_TYPE = "phi4flash"

# Layer kinds, in the order they appear in a SambaY network (see SPEC.md section 1).
MAMBA = "mamba"  # Mamba-1 in the self-decoder
SWA = "swa"  # sliding-window (or, with sliding_window None, full) self-attention
MEMORY_MAMBA = "memory_mamba"  # Mamba at L/2 whose SSM output y becomes the shared memory
KV_ATTENTION = "kv_attention"  # full causal attention at L/2+1 whose K/V are shared
GMU = "gmu"  # gated memory unit reading the shared memory
CROSS_ATTENTION = "cross_attention"  # queries only, over the shared K/V

LAYER_LETTERS = {MAMBA: "M", SWA: "S", MEMORY_MAMBA: "M", KV_ATTENTION: "A", GMU: "G", CROSS_ATTENTION: "X"}


@dataclass
class SambaYConfig:
    # Keys of the real config.json, with the real model's values as defaults.
    vocab_size: int = 200064
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 40
    num_key_value_heads: int = 20
    hidden_act: str = "silu"
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    sliding_window: int | None = 512
    mb_per_layer: int = 2
    pad_token_id: int | None = 199999
    bos_token_id: int | None = 199999
    eos_token_id: int | list[int] | None = 199999
    attention_dropout: float = 0.0
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"
    use_cache: bool = True
    mlp_bias: bool = False
    lm_head_bias: bool = False
    # Absent from the real config.json; these defaults are the reference config class's.
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # sambay's own switch (the reference always uses differential attention); written to
    # config.json only when off, so files for the real architecture stay identical.
    differential_attention: bool = True
    # Keys we do not interpret (auto_map, _attn_implementation, transformers_version, ...), kept
    # so that a config read and written back loses nothing.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        if self.mamba_dt_rank == "auto":
            return math.ceil(self.hidden_size / 16)
        return int(self.mamba_dt_rank)

    @property
    def memory_layer(self) -> int:
        """Index of the Mamba layer that emits the shared memory (L/2)."""
        return self.num_hidden_layers // 2

    @property
    def kv_layer(self) -> int:
        """Index of the full-attention layer that emits the shared K/V (L/2 + 1)."""
        return self.num_hidden_layers // 2 + 1

    @property
    def layer_kinds(self) -> list[str]:
        kinds = []
        for i in range(self.num_hidden_layers):
            even = i % self.mb_per_layer == 0
            if i < self.memory_layer:
                kinds.append(MAMBA if even else SWA)
            elif i == self.memory_layer:
                kinds.append(MEMORY_MAMBA)
            elif i == self.kv_layer:
                kinds.append(KV_ATTENTION)
            else:
                kinds.append(GMU if even else CROSS_ATTENTION)
        return kinds

    @property
    def layout(self) -> str:
        """The layer pattern as a short string: self-decoder | cross-decoder, e.g. `MSMSMA|GX`."""
        letters = [LAYER_LETTERS[k] for k in self.layer_kinds]
        return "".join(letters[: self.kv_layer + 1]) + "|" + "".join(letters[self.kv_layer + 1 :])

    def window_of(self, layer: int) -> int | None:
        """Sliding window of an attention layer (None = unlimited)."""
        return self.sliding_window if self.layer_kinds[layer] == SWA else None

    def lambda_init(self, layer: int) -> float:
        return 0.8 - 0.6 * math.exp(-0.3 * layer)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> SambayError:
            return SambayError(f"invalid SambaY config: {msg}")

        L = self.num_hidden_layers
        if L < 4 or L % 4 != 0:
            raise bad(f"num_hidden_layers must be a positive multiple of 4 (the self- and cross-decoder "
                      f"halves each alternate two layer kinds), got {L}")
        if self.mb_per_layer != 2:
            raise bad(f"mb_per_layer must be 2 (Mamba on even layers, attention on odd ones), got "
                      f"{self.mb_per_layer}")
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "vocab_size", "mamba_d_state", "mamba_d_conv", "mamba_expand"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % H:
            raise bad(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {H}")
        if H % Hkv:
            raise bad(f"num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
        if self.differential_attention and (H % 2 or Hkv % 2):
            raise bad(f"differential attention pairs heads, so num_attention_heads ({H}) and "
                      f"num_key_value_heads ({Hkv}) must both be even")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise bad(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.mamba_dt_rank != "auto" and (not isinstance(self.mamba_dt_rank, int)
                                             or self.mamba_dt_rank < 1):
            raise bad(f"mamba_dt_rank must be 'auto' or a positive integer, got {self.mamba_dt_rank!r}")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act must be 'silu' (the only activation SambaY uses), got "
                      f"{self.hidden_act!r}")
        if not self.tie_word_embeddings:
            raise bad("tie_word_embeddings must be true: SambaY's output head is the embedding matrix")

    # ---- sizes --------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        d, e, n, r, k = self.hidden_size, self.d_inner, self.mamba_d_state, self.dt_rank, self.mamba_d_conv
        hd, H, Hkv = self.head_dim, self.num_attention_heads, self.num_key_value_heads
        pb, cb = int(self.mamba_proj_bias), int(self.mamba_conv_bias)
        norms = 2 * 2 * d
        mlp = d * 2 * self.intermediate_size + self.intermediate_size * d
        mamba = (d * 2 * e + pb * 2 * e) + e * k + cb * e + e * (r + 2 * n) + (r * e + e) + e * n + e \
            + (e * d + pb * d)
        gmu = d * e + e * d
        diff = 4 * hd + 2 * hd if self.differential_attention else 0
        attn = d * (H + 2 * Hkv) * hd + (H + 2 * Hkv) * hd + H * hd * d + d + diff
        cross = d * H * hd + H * hd + H * hd * d + d + diff
        per_kind = {MAMBA: mamba, MEMORY_MAMBA: mamba, SWA: attn, KV_ATTENTION: attn, GMU: gmu,
                    CROSS_ATTENTION: cross}
        total = self.vocab_size * d + 2 * d  # tied embedding + final norm
        return total + sum(norms + mlp + per_kind[k] for k in self.layer_kinds)

    def state_bytes_per_token(self, kv_bytes: int = 2) -> int:
        """Decode-state bytes added per token of context: the shared K/V of the one full layer."""
        return 2 * self.num_key_value_heads * self.head_dim * kv_bytes

    def state_bytes_fixed(self, batch: int = 1, kv_bytes: int = 2) -> int:
        """Decode-state bytes that do not grow with context: conv windows, SSM states, SWA buffers."""
        kinds = self.layer_kinds
        n_mamba = sum(k in (MAMBA, MEMORY_MAMBA) for k in kinds)
        n_swa = sum(k == SWA for k in kinds)
        conv = self.d_inner * (self.mamba_d_conv - 1) * kv_bytes
        ssm = self.d_inner * self.mamba_d_state * 4
        swa = 0 if self.sliding_window is None else \
            2 * self.num_key_value_heads * self.head_dim * self.sliding_window * kv_bytes
        return batch * (n_mamba * (conv + ssm) + n_swa * swa)

    # ---- json ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SambaYConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        extra = data
        if isinstance(kwargs.get("sliding_window"), list):
            # Some exported configs list the window per layer; SambaY uses one window for all SWA layers.
            windows = {w for w in kwargs["sliding_window"] if w is not None}
            if len(windows) > 1:
                raise SambayError(f"invalid SambaY config: sliding_window lists different windows "
                                  f"{sorted(windows)}; SambaY uses one window for every SWA layer")
            kwargs["sliding_window"] = windows.pop() if windows else None
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            if f.name == "differential_attention" and self.differential_attention:
                continue
            out[f.name] = getattr(self, f.name)
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SambaYConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise SambayError(f"no config.json at {path}: a model folder needs config.json next to its "
                              f"weights") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SambayError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from None
        if not isinstance(data, dict):
            raise SambayError(f"{path} must hold a JSON object, found {type(data).__name__}")
        archs = data.get("architectures") or []
        model_type = data.get("model_type")
        if ARCHITECTURE not in archs and model_type != MODEL_TYPE:
            raise SambayError(f"{path} describes a {model_type or 'unknown'} model "
                              f"(architectures {archs}); sambay loads {ARCHITECTURE} "
                              f"(model_type '{MODEL_TYPE}') checkpoints such as "
                              f"microsoft/Phi-4-mini-flash-reasoning")
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise SambayError(f"invalid SambaY config in {path}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        from .io_utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> SambaYConfig:
        return dataclasses.replace(self, **changes)


def _tiny(**kw: Any) -> SambaYConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                max_position_embeddings=4096, pad_token_id=511, bos_token_id=511, eos_token_id=511,
                torch_dtype="float32")
    base.update(kw)
    return SambaYConfig(**base)


# Named presets. `phi4-mini-flash` is the exact released shape; the others keep its layer layout
# (Mamba/SWA self-decoder, one full-attention layer, GMU/cross-attention cross-decoder) at sizes
# that run quickly on a laptop CPU.
PRESETS: dict[str, Any] = {
    "phi4-mini-flash": lambda: SambaYConfig(),
    "tiny": lambda: _tiny(),
    "tiny-nodiff": lambda: _tiny(differential_attention=False),
    "small": lambda: _tiny(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           sliding_window=128, pad_token_id=0, bos_token_id=0, eos_token_id=0),
}


def preset(name: str) -> SambaYConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise SambayError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
