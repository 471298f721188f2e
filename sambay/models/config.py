"""Model configurations: dataclasses that read and write Hugging Face `config.json`.

`SambaYConfig` is SambaY (Phi-4-mini-flash-reasoning); `Phi3Config` is the Transformer baseline it is
compared with (Phi-4-mini-reasoning, Hugging Face's `Phi3ForCausalLM`). Both derive from
`ModelConfig`, which holds what the two families' files share and all of the file handling, so the
families differ only in their own keys and in what they derive from them. The field names are the
keys of the real `config.json` files, so a config read from a checkpoint and written back is the same
file (unknown keys such as `auto_map` are kept in `extra`). Everything else about the network, above
all the per-layer layout, is derived from these fields. `load_config` picks the class from the file.

The named presets live in sambay.models.presets.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from sambay.errors import SambayError
from sambay.files import atomic_write_text, read_json

ARCHITECTURE = "Phi4FlashForCausalLM"
MODEL_TYPE = "phi4flash"
PHI3_ARCHITECTURE = "Phi3ForCausalLM"
PHI3_MODEL_TYPE = "phi3"

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


# Fields are keyword-only: the families' fields interleave with the shared ones in config.json, so
# the declaration order (base first) is not an order anyone should pass values in. For the same
# reason `__repr__` is the base's, in KEY_ORDER, rather than the one dataclass would generate.
@dataclass(kw_only=True, repr=False)
class ModelConfig(abc.ABC):
    """Either family's config: the config.json keys both families have and the file handling.

    A family sets the class constants below, declares its own keys (and its defaults for the shared
    keys whose values differ) and adds its checks through the `_validate_*` hooks.
    """

    ARCHITECTURE: ClassVar[str]  # written as `architectures: [...]` and recognised when reading
    MODEL_TYPE: ClassVar[str]
    FAMILY: ClassVar[str]  # the name in messages ("invalid SambaY config: ...")
    # The order `to_dict` writes the keys in (fields not listed follow, in declaration order): the
    # family's own keys sit beside the shared ones they belong with, as in every file sambay writes.
    KEY_ORDER: ClassVar[tuple[str, ...]] = ()
    # Integer fields that must be positive, in the order they are checked.
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ()

    # Keys of both families' config.json. Where the families' values differ, the family sets the default.
    vocab_size: int = 200064
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int = 32
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str = "silu"
    max_position_embeddings: int
    sliding_window: int | None
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
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    @abc.abstractmethod
    def layer_kinds(self) -> list[str]:
        """The kind of every layer (MAMBA, SWA, ..., ATTENTION), first to last."""

    @property
    @abc.abstractmethod
    def layout(self) -> str:
        """The layer pattern as a short string of LAYER_LETTERS."""

    @abc.abstractmethod
    def window_of(self, layer: int) -> int | None:
        """Sliding window of an attention layer (None = unlimited)."""

    # ---- checks -------------------------------------------------------------------------------
    @classmethod
    def _invalid(cls, msg: str) -> SambayError:
        return SambayError(f"invalid {cls.FAMILY} config: {msg}")

    def validate(self) -> None:
        """Refuse a config the modules could not be built from. The checks both families make run
        here; a family adds its own before them (its layer pattern), after the head counts (how the
        heads are split) and at the end, so each message comes in the same order as always."""
        self._validate_layers()
        for name in self.POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise self._invalid(f"{name} must be a positive integer, got {value!r}")
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % H:
            raise self._invalid(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {H}")
        if H % Hkv:
            raise self._invalid(f"num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
        self._validate_heads()
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise self._invalid(f"sliding_window must be a positive integer or null, got "
                                f"{self.sliding_window!r}")
        self._validate_family()

    def _validate_layers(self) -> None:
        """The family's rules on the number and pattern of layers."""

    def _validate_heads(self) -> None:
        """The family's rules on how attention heads are split (paired, rotated)."""

    def _validate_family(self) -> None:
        """The family's remaining rules."""

    # ---- sizes --------------------------------------------------------------------------------
    @abc.abstractmethod
    def num_parameters(self) -> int:
        """Parameters the module holds (tied weights counted once)."""

    @abc.abstractmethod
    def state_bytes_per_token(self, kv_bytes: int = 2) -> int:
        """Decode-state bytes added per token of context."""

    @abc.abstractmethod
    def state_bytes_fixed(self, batch: int = 1, kv_bytes: int = 2) -> int:
        """Decode-state bytes that do not grow with context."""

    # ---- json ---------------------------------------------------------------------------------
    @classmethod
    def _normalize(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Read other writers' spellings of the family's keys (`data` is a copy to change)."""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The config of a config.json's contents; on ModelConfig itself, of the family they name."""
        if cls is ModelConfig:
            return config_from_dict(data)
        data = cls._normalize(dict(data))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        for written_by_to_dict in ("architectures", "model_type"):
            data.pop(written_by_to_dict, None)
        return cls(**kwargs, extra=data)

    def _ordered_fields(self) -> dict[str, Any]:
        """Every field but `extra`, in KEY_ORDER."""
        rank = {name: i for i, name in enumerate(self.KEY_ORDER)}
        names = sorted((f.name for f in dataclasses.fields(self) if f.name != "extra"),
                       key=lambda name: rank.get(name, len(rank)))  # stable: unlisted keep their order
        return {name: getattr(self, name) for name in names}

    def _json_fields(self) -> dict[str, Any]:
        """The fields `to_dict` writes."""
        return self._ordered_fields()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [self.ARCHITECTURE], "model_type": self.MODEL_TYPE}
        out.update(self._json_fields())
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Self:
        """Read a config.json, refusing one of another family than `cls`."""
        cfg = load_config(path)
        if not isinstance(cfg, cls):
            raise SambayError(f"{path} describes a {cfg.FAMILY} model, not {cls.FAMILY}")
        return cfg

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated again."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        items = {**self._ordered_fields(), "extra": self.extra}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in items.items())})"


@dataclass(kw_only=True, repr=False)
class SambaYConfig(ModelConfig):
    """SambaY, Hugging Face's `Phi4FlashForCausalLM` (Phi-4-mini-flash-reasoning).

    A self-decoder of Mamba and sliding-window attention layers ending in one full-attention layer
    whose K/V the cross-decoder's cross-attention layers share, its GMU layers reading the memory
    of the Mamba layer at L/2. The defaults are Phi-4-mini-flash-reasoning's config.json.
    """

    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    FAMILY: ClassVar[str] = "SambaY"
    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "layer_norm_eps", "max_position_embeddings", "sliding_window",
        "mb_per_layer", "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout", "embd_pdrop",
        "resid_pdrop", "initializer_range", "tie_word_embeddings", "torch_dtype", "use_cache", "mlp_bias",
        "lm_head_bias", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias",
        "mamba_proj_bias", "differential_attention")
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "mamba_d_state", "mamba_d_conv", "mamba_expand")

    # Keys of the real config.json, with the real model's values as defaults.
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_attention_heads: int = 40
    num_key_value_heads: int = 20
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    sliding_window: int | None = 512
    mb_per_layer: int = 2
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

    # ---- derived quantities -------------------------------------------------------------------
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

    # ---- checks -------------------------------------------------------------------------------
    def _validate_layers(self) -> None:
        L = self.num_hidden_layers
        if L < 4 or L % 4 != 0:
            raise self._invalid(f"num_hidden_layers must be a positive multiple of 4 (the self- and "
                                f"cross-decoder halves each alternate two layer kinds), got {L}")
        if self.mb_per_layer != 2:
            raise self._invalid(f"mb_per_layer must be 2 (Mamba on even layers, attention on odd ones), "
                                f"got {self.mb_per_layer}")

    def _validate_heads(self) -> None:
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        if self.differential_attention and (H % 2 or Hkv % 2):
            raise self._invalid(f"differential attention pairs heads, so num_attention_heads ({H}) and "
                                f"num_key_value_heads ({Hkv}) must both be even")

    def _validate_family(self) -> None:
        if self.mamba_dt_rank != "auto" and (not isinstance(self.mamba_dt_rank, int)
                                             or self.mamba_dt_rank < 1):
            raise self._invalid(f"mamba_dt_rank must be 'auto' or a positive integer, got "
                                f"{self.mamba_dt_rank!r}")
        if self.hidden_act != "silu":
            raise self._invalid(f"hidden_act must be 'silu' (the only activation SambaY uses), got "
                                f"{self.hidden_act!r}")
        if not self.tie_word_embeddings:
            raise self._invalid("tie_word_embeddings must be true: SambaY's output head is the embedding "
                                "matrix")

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
    def _normalize(cls, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("sliding_window"), list):
            # Some exported configs list the window per layer; SambaY uses one window for all SWA layers.
            windows = {w for w in data["sliding_window"] if w is not None}
            if len(windows) > 1:
                raise cls._invalid(f"sliding_window lists different windows {sorted(windows)}; SambaY uses "
                                   f"one window for every SWA layer")
            data["sliding_window"] = windows.pop() if windows else None
        return data

    def _json_fields(self) -> dict[str, Any]:
        out = super()._json_fields()
        if self.differential_attention:
            del out["differential_attention"]  # the reference's only mode: see the field
        return out


@dataclass(kw_only=True, repr=False)
class Phi3Config(ModelConfig):
    """The Transformer baseline: Hugging Face's `Phi3ForCausalLM` (Phi-3, Phi-4-mini[-reasoning]).

    Every layer is causal self-attention (fused qkv_proj, RoPE on the first `partial_rotary_factor`
    of each head, grouped-query K/V) and a SwiGLU MLP (fused gate_up_proj), with RMSNorm. The defaults
    are Phi-4-mini-reasoning's config.json. `rope_scaling` may hold LongRoPE factors
    (`{"type": "longrope", "short_factor": [...], "long_factor": [...]}`), used as transformers does.
    """

    ARCHITECTURE: ClassVar[str] = PHI3_ARCHITECTURE
    MODEL_TYPE: ClassVar[str] = PHI3_MODEL_TYPE
    FAMILY: ClassVar[str] = "Phi3"
    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
        "original_max_position_embeddings", "rope_theta", "partial_rotary_factor", "rope_scaling",
        "sliding_window", "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout", "embd_pdrop",
        "resid_pdrop", "initializer_range", "tie_word_embeddings", "torch_dtype", "use_cache",
        "attention_bias", "mlp_bias", "lm_head_bias")
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "max_position_embeddings", "original_max_position_embeddings")

    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.75
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = 262144
    attention_bias: bool = False

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
    def longrope(self) -> bool:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type")) in ("longrope", "su", "yarn")

    # ---- checks -------------------------------------------------------------------------------
    def _validate_heads(self) -> None:
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise self._invalid(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and "
                                f"give an even number of rotary dimensions (head_dim {self.head_dim})")

    def _validate_family(self) -> None:
        if self.hidden_act != "silu":
            raise self._invalid(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.attention_bias or self.mlp_bias or self.lm_head_bias:
            raise self._invalid("attention_bias, mlp_bias and lm_head_bias must be false (Phi-3 and "
                                "Phi-4-mini have no biases)")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
            if kind in ("su", "yarn"):  # older names of the same scheme, as transformers reads them
                kind = "longrope"
            if kind not in ("longrope", "default"):
                raise self._invalid(f"rope_scaling type must be 'longrope' (or absent), got {rs!r}")
            if kind == "longrope":
                for key in ("short_factor", "long_factor"):
                    f = rs.get(key)
                    if not isinstance(f, list) or len(f) != self.rotary_dim // 2:
                        raise self._invalid(f"rope_scaling.{key} must list {self.rotary_dim // 2} numbers "
                                            f"(half the rotary dimensions), got {f!r}")

    # ---- sizes --------------------------------------------------------------------------------
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

    # ---- json ---------------------------------------------------------------------------------
    @classmethod
    def _normalize(cls, data: dict[str, Any]) -> dict[str, Any]:
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
        return data


# The families config.json can name. A file naming several is read as the first listed here.
FAMILIES: tuple[type[ModelConfig], ...] = (Phi3Config, SambaYConfig)


def config_class(data: dict[str, Any]) -> type[ModelConfig] | None:
    """The family named by a config.json's `architectures` or `model_type`, if sambay has it."""
    archs = data.get("architectures") or []
    model_type = data.get("model_type")
    return next((cls for cls in FAMILIES if cls.ARCHITECTURE in archs or model_type == cls.MODEL_TYPE), None)


def config_from_dict(data: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The config of the family named by `architectures` or `model_type`."""
    cls = config_class(data)
    if cls is None:
        raise SambayError(f"{where} describes a {data.get('model_type') or 'unknown'} model (architectures "
                          f"{data.get('architectures') or []}); sambay loads {ARCHITECTURE} (model_type "
                          f"'{MODEL_TYPE}') checkpoints such as microsoft/Phi-4-mini-flash-reasoning, and the "
                          f"{PHI3_ARCHITECTURE} baseline (Phi-3, Phi-4-mini)")
    try:
        return cls.from_dict(data)
    except TypeError as e:
        raise SambayError(f"invalid {cls.FAMILY} config in {where}: {e}") from None


_NO_FILE = object()


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a config.json of either family."""
    data = read_json(path, default=_NO_FILE)
    if data is _NO_FILE:
        raise SambayError(f"no config.json at {path}: a model folder needs config.json next to its weights")
    if not isinstance(data, dict):
        raise SambayError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return config_from_dict(data, str(path))
