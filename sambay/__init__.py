"""sambay: run, serve and train SambaY / Phi-4-mini-flash models on ordinary CPUs."""

from .config import PRESETS, SambaYConfig, preset
from .errors import SambayError

__version__ = "0.1.0"
