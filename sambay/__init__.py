"""sambay: run, serve and train SambaY / Phi-4-mini-flash models on ordinary CPUs.

    import sambay
    model, tokenizer = sambay.load_for_inference("path/to/Phi-4-mini-flash-reasoning", quantize="int8")
    for piece in sambay.stream(model, tokenizer, "Hello"):
        print(piece, end="")

The public names below are imported on first use, so `import sambay.models` (the reference modules
alone) does not pull in the kernels, the runtime or the server.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "sambay.runtime.checkpoint", "save_model": "sambay.runtime.checkpoint",
    "load_for_inference": "sambay.runtime.load", "load_tokenizer": "sambay.tokenizer",
    "Engine": "sambay.runtime.engine", "generate": "sambay.runtime.generate", "stream": "sambay.runtime.generate",
    "SamplingParams": "sambay.runtime.sampling", "SambayError": "sambay.errors",
    "PRESETS": "sambay.models", "preset": "sambay.models", "load_config": "sambay.models",
    "SambaYConfig": "sambay.models", "Phi3Config": "sambay.models", "CausalLM": "sambay.models",
    "DecodeState": "sambay.models", "SambaY": "sambay.models", "Phi3": "sambay.models", "build_model": "sambay.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sambay' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
