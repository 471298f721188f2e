"""The models: plain PyTorch reference modules of the two families (SambaY, the Phi3 baseline).

Nothing here knows about native kernels or quantization: those are applied from outside, when a
model is prepared for inference (sambay.kernels.prepare).
"""

from sambay.models.base import CausalLM
from sambay.models.config import (ATTENTION, CROSS_ATTENTION, GMU, KV_ATTENTION, MAMBA, MEMORY_MAMBA, SWA, ModelConfig,
                                  Phi3Config, SambaYConfig, config_from_dict, load_config)
from sambay.models.phi3 import Phi3
from sambay.models.presets import PRESETS, preset
from sambay.models.registry import FAMILIES, build_model
from sambay.models.sambay import SambaY
from sambay.models.state import DecodeState, Positions

__all__ = ["ATTENTION", "CROSS_ATTENTION", "GMU", "KV_ATTENTION", "MAMBA", "MEMORY_MAMBA", "SWA", "config_from_dict",
           "FAMILIES", "PRESETS", "CausalLM", "DecodeState", "Positions", "ModelConfig", "Phi3", "Phi3Config", "SambaY", "SambaYConfig",
           "build_model", "load_config", "preset"]
