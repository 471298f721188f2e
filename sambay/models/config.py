"""Model configurations: dataclasses that read and write Hugging Face `config.json`.

`SambaYConfig` is SambaY (Phi-4-mini-flash-reasoning); `Phi3Config` is the Transformer baseline it is
compared with (Phi-4-mini-reasoning, Hugging Face's `Phi3ForCausalLM`). The field names are the keys
of the real `config.json` files, so a config read from a checkpoint and written back is the same file
(unknown keys such as `auto_map` are kept in `extra`). Everything else about the network, above all
the per-layer layout, is derived from these fields. `load_config` picks the class from the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from sambay.errors import SambayError

ARCHITECTURE = "Phi4FlashForCausalLM"
MODEL_TYPE = "phi4flash"

# Layer kinds, in the order they appear in a SambaY network (see SPEC.md section 1).
MAMBA = "mamba"  # Mamba-1 in the self-decoder
SWA = "swa"  # sliding-window (or, with sliding_window None, full) self-attention
MEMORY_MAMBA = "memory_mamba"  # Mamba at L/2 whose SSM output y becomes the shared memory
KV_ATTENTION = "kv_attention"  # full causal attention at L/2+1 whose K/V are shared
GMU = "gmu"  # gated memory unit reading the shared memory
CROSS_ATTENTION = "cross_attention"  # queries only, over the shared K/V

ATTENTION = "attention"  # the baseline Transformer's causal self-attention with RoPE

LAYER_LETTERS = {MAMBA: "M", SWA: "S", MEMORY_MAMBA: "M", KV_ATTENTION: "A", GMU: "G", CROSS_ATTENTION: "X",
                 ATTENTION: "T"}


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
        cfg = load_config(path)
        if not isinstance(cfg, cls):
            raise SambayError(f"{path} describes a {type(cfg).__name__.removesuffix('Config')} model, "
                              f"not SambaY")
        return cfg

    def to_json(self, path: str | os.PathLike) -> None:
        from sambay.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> SambaYConfig:
        return dataclasses.replace(self, **changes)


PHI3_ARCHITECTURE = "Phi3ForCausalLM"
PHI3_MODEL_TYPE = "phi3"


@dataclass
class Phi3Config:
    """The Transformer baseline: Hugging Face's `Phi3ForCausalLM` (Phi-3, Phi-4-mini[-reasoning]).

    Every layer is causal self-attention (fused qkv_proj, RoPE on the first `partial_rotary_factor`
    of each head, grouped-query K/V) and a SwiGLU MLP (fused gate_up_proj), with RMSNorm. The defaults
    are Phi-4-mini-reasoning's config.json. `rope_scaling` may hold LongRoPE factors
    (`{"type": "longrope", "short_factor": [...], "long_factor": [...]}`), used as transformers does.
    """

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.75
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = 262144
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
    attention_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_kinds(self) -> list[str]:
        return [ATTENTION] * self.num_hidden_layers

    @property
    def layout(self) -> str:
        return LAYER_LETTERS[ATTENTION] * self.num_hidden_layers

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window

    @property
    def eos_token_ids(self) -> list[int]:
        return SambaYConfig.eos_token_ids.fget(self)

    def validate(self) -> None:
        def bad(msg: str) -> SambayError:
            return SambayError(f"invalid Phi3 config: {msg}")

        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "max_position_embeddings",
                     "original_max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % H:
            raise bad(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {H}")
        if H % Hkv:
            raise bad(f"num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise bad(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and give an "
                      f"even number of rotary dimensions (head_dim {self.head_dim})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise bad(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.attention_bias or self.mlp_bias or self.lm_head_bias:
            raise bad("attention_bias, mlp_bias and lm_head_bias must be false (Phi-3 and Phi-4-mini "
                      "have no biases)")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
            if kind in ("su", "yarn"):  # older names of the same scheme, as transformers reads them
                kind = "longrope"
            if kind not in ("longrope", "default"):
                raise bad(f"rope_scaling type must be 'longrope' (or absent), got {rs!r}")
            if kind == "longrope":
                for key in ("short_factor", "long_factor"):
                    f = rs.get(key)
                    if not isinstance(f, list) or len(f) != self.rotary_dim // 2:
                        raise bad(f"rope_scaling.{key} must list {self.rotary_dim // 2} numbers (half "
                                  f"the rotary dimensions), got {f!r}")

    @property
    def longrope(self) -> bool:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type")) in ("longrope", "su", "yarn")

    def num_parameters(self) -> int:
        d, hd, H, Hkv, L = self.hidden_size, self.head_dim, self.num_attention_heads, \
            self.num_key_value_heads, self.num_hidden_layers
        per_layer = d * (H + 2 * Hkv) * hd + H * hd * d + 3 * d * self.intermediate_size + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + L * per_layer + d

    def state_bytes_per_token(self, kv_bytes: int = 2) -> int:
        """Decode-state bytes per token of context: K and V of every layer (within the window)."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * kv_bytes

    def state_bytes_fixed(self, batch: int = 1, kv_bytes: int = 2) -> int:
        return 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Phi3Config:
        data = dict(data)
        if data.get("num_key_value_heads") is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        # transformers 5 writes RoPE settings as `rope_parameters`; older files as rope_theta/rope_scaling.
        params = data.pop("rope_parameters", None)
        if isinstance(params, dict):
            data.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            data.setdefault("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
            if params.get("rope_type", "default") != "default":
                data.setdefault("rope_scaling", {k: v for k, v in params.items()
                                                 if k not in ("rope_theta", "partial_rotary_factor")})
        data.setdefault("partial_rotary_factor", 1.0)  # absent in Phi-3 files: the whole head rotates
        data.setdefault("sliding_window", None)
        data.setdefault("tie_word_embeddings", False)  # transformers' default for Phi3
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        for written_by_to_dict in ("architectures", "model_type"):
            data.pop(written_by_to_dict, None)
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [PHI3_ARCHITECTURE], "model_type": PHI3_MODEL_TYPE}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        SambaYConfig.to_json(self, path)

    def replace(self, **changes: Any) -> Phi3Config:
        return dataclasses.replace(self, **changes)


ModelConfig = SambaYConfig | Phi3Config


def config_from_dict(data: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The config of the family named by `architectures` or `model_type`."""
    archs = data.get("architectures") or []
    model_type = data.get("model_type")
    if PHI3_ARCHITECTURE in archs or model_type == PHI3_MODEL_TYPE:
        cls = Phi3Config
    elif ARCHITECTURE in archs or model_type == MODEL_TYPE:
        cls = SambaYConfig
    else:
        raise SambayError(f"{where} describes a {model_type or 'unknown'} model (architectures {archs}); "
                          f"sambay loads {ARCHITECTURE} (model_type '{MODEL_TYPE}') checkpoints such as "
                          f"microsoft/Phi-4-mini-flash-reasoning, and the {PHI3_ARCHITECTURE} baseline "
                          f"(Phi-3, Phi-4-mini)")
    try:
        return cls.from_dict(data)
    except TypeError as e:
        raise SambayError(f"invalid {cls.__name__.removesuffix('Config')} config in {where}: {e}") from None


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a config.json of either family."""
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
    return config_from_dict(data, str(path))


def _tiny(**kw: Any) -> SambaYConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                max_position_embeddings=4096, pad_token_id=511, bos_token_id=511, eos_token_id=511,
                torch_dtype="float32")
    base.update(kw)
    return SambaYConfig(**base)


def _tiny_phi3(**kw: Any) -> Phi3Config:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                sliding_window=None, pad_token_id=511, bos_token_id=511, eos_token_id=511,
                torch_dtype="float32")
    base.update(kw)
    return Phi3Config(**base)


# Named presets. `phi4-mini-flash` and `phi4-mini` are the exact released shapes (SambaY and its
# Transformer baseline); the others run quickly on a laptop CPU. The `-scaled` pair keeps both
# released layouts, layer counts, head counts and the ratio of their decode-state sizes (25.6x per
# token) at a quarter of the width, for the generation benchmark. `small-phi3` is a Transformer++
# (full RoPE) of the same size as `small`, for training comparisons.
PRESETS: dict[str, Any] = {
    "phi4-mini-flash": lambda: SambaYConfig(),
    "phi4-mini": lambda: Phi3Config(),
    "phi4-mini-flash-scaled": lambda: SambaYConfig(
        vocab_size=32064, hidden_size=640, intermediate_size=2560, num_attention_heads=40,
        num_key_value_heads=20, pad_token_id=32000, bos_token_id=32000, eos_token_id=32000),
    "phi4-mini-scaled": lambda: Phi3Config(
        vocab_size=32064, hidden_size=768, intermediate_size=2048, num_attention_heads=24,
        num_key_value_heads=8, pad_token_id=32000, bos_token_id=32000, eos_token_id=32000),
    "tiny": lambda: _tiny(),
    "tiny-nodiff": lambda: _tiny(differential_attention=False),
    "tiny-phi3": lambda: _tiny_phi3(partial_rotary_factor=0.75),
    "small": lambda: _tiny(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           sliding_window=128, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "small-phi3": lambda: _tiny_phi3(vocab_size=4096, hidden_size=256, intermediate_size=1152,
                                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=0),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise SambayError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
