"""Named model configurations (`--preset NAME`, `sambay.preset(NAME)`).

`phi4-mini-flash` and `phi4-mini` are the exact released shapes (SambaY and its Transformer
baseline); the others run quickly on a laptop CPU. The `-scaled` pair keeps both released layouts,
layer counts, head counts and the ratio of their decode-state sizes (25.6x per token) at a quarter of
the width, for the generation benchmark. `small-phi3` is a Transformer++ (full RoPE) of the same size
as `small`, for training comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sambay.errors import SambayError
from sambay.models.config import ModelConfig, Phi3Config, SambaYConfig


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


# Each entry makes a new config, so a caller may change the one it gets.
PRESETS: dict[str, Callable[[], ModelConfig]] = {
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
