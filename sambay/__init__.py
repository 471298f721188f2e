"""sambay: run, serve and train SambaY / Phi-4-mini-flash models on ordinary CPUs.

    import sambay, torch
    model = sambay.load_model("path/to/Phi-4-mini-flash-reasoning", dtype=torch.bfloat16)
    tok = sambay.load_tokenizer("path/to/Phi-4-mini-flash-reasoning")
"""

from sambay.runtime.checkpoint import load_model, save_model
from sambay.errors import SambayError
from sambay.runtime.engine import Engine
from sambay.runtime.generate import generate, stream
from sambay.models import PRESETS, CausalLM, DecodeState, Phi3, Phi3Config, SambaY, SambaYConfig, build_model, \
    load_config, preset
from sambay.runtime.sampling import SamplingParams

__version__ = "0.1.0"


def load_tokenizer(path=None):
    """Load the tokenizer of a model folder (see sambay.tokenizer.load_tokenizer)."""
    from sambay.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["CausalLM", "DecodeState", "Engine", "PRESETS", "Phi3", "Phi3Config", "SamplingParams", "SambaY",
           "SambaYConfig", "SambayError", "build_model", "generate", "load_config", "load_model",
           "load_tokenizer", "preset", "save_model", "stream"]
