"""The models: plain PyTorch reference modules of the two families (SambaY, the Phi3 baseline).

Nothing here knows about native kernels or quantization: those are applied from outside, when a
model is prepared for inference (sambay.kernels.prepare).
"""

from sambay.models.config import PRESETS, ModelConfig, Phi3Config, SambaYConfig, load_config, preset
from sambay.models.phi3 import Phi3
from sambay.models.sambay import CausalLM, DecodeState, SambaY, build_model

__all__ = ["PRESETS", "CausalLM", "DecodeState", "ModelConfig", "Phi3", "Phi3Config", "SambaY", "SambaYConfig",
           "build_model", "load_config", "preset"]
