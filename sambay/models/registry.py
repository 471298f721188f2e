"""The model families and `build_model`, which makes the model of a config's family."""

from __future__ import annotations

import torch

from sambay.errors import SambayError
from sambay.models.base import FP32_PARAMS, CausalLM
from sambay.models.config import Phi3Config, SambaYConfig
from sambay.models.phi3 import Phi3
from sambay.models.sambay import SambaY

# config class -> model class
FAMILIES: dict[type, type[CausalLM]] = {SambaYConfig: SambaY, Phi3Config: Phi3}


def build_model(config, dtype: torch.dtype = torch.float32, device: str = "cpu",
                init: bool = True, seed: int = 0, fast_init: bool = False) -> CausalLM:
    """Build the model of `config`'s family (SambaY, or the Phi3 Transformer baseline) without a
    float32 detour: allocate on the meta device, then materialize directly in `dtype` (a
    3.8B-parameter bf16 model needs 7.7 GB, not 15 GB first)."""
    family = next((cls for kind, cls in FAMILIES.items() if isinstance(config, kind)), None)
    if family is None:
        raise SambayError(f"no model family for a {type(config).__name__}; expected one of "
                          f"{', '.join(k.__name__ for k in FAMILIES)}")
    with torch.device("meta"):
        model = family(config)
    for name, p in model.named_parameters():
        want = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype
        if p.dtype != want:
            p.data = torch.empty(p.shape, dtype=want, device="meta")
    if device == "meta":  # shapes and dtypes only; the checkpoint loader assigns the real tensors
        return model
    model = model.to_empty(device=device)
    if init:
        model.init_weights(seed, fast=fast_init)
    return model.eval()
