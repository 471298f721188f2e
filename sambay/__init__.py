"""sambay: run, serve and train SambaY / Phi-4-mini-flash models on ordinary CPUs.

    import sambay, torch
    model = sambay.load_model("path/to/Phi-4-mini-flash-reasoning", dtype=torch.bfloat16)
    tok = sambay.load_tokenizer("path/to/Phi-4-mini-flash-reasoning")
"""

from .checkpoint import load_model, save_model
from .config import PRESETS, Phi3Config, SambaYConfig, load_config, preset
from .errors import SambayError
from .engine import Engine, generate, stream
from .model import CausalLM, DecodeState, SambaY, build_model
from .transformer import Phi3
from .sampling import SamplingParams

__version__ = "0.1.0"


def load_tokenizer(path=None):
    """Load the tokenizer of a model folder (see sambay.tokenizer.load_tokenizer)."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["CausalLM", "DecodeState", "Engine", "PRESETS", "Phi3", "Phi3Config", "SamplingParams", "SambaY",
           "SambaYConfig", "SambayError", "build_model", "generate", "load_config", "load_model",
           "load_tokenizer", "preset", "save_model", "stream"]
