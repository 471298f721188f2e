"""What `sambay serve` is told: one Settings object, made by the CLI from its flags (each flag has an
environment twin, SAMBAY_PORT and so on, see sambay/cli/serve.py) or by a caller directly.

The dataclass defaults are the flags' defaults, so a library caller and the command line start
from the same server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sambay.errors import SambayError

DEFAULT_MAX_MODEL_LEN = 8192  # tokens per batch row (prompt + completion) unless max_model_len


@dataclass
class Settings:
    """Everything `sambay serve` is told (`sambay serve --help` says what each one means)."""

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    random_weights: bool = False
    max_batch_size: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    max_tokens: int | None = None  # None: what the context leaves (reasoning replies are long)
    reasoning_format: str = "auto"  # "auto": <think>...</think> goes to reasoning_content; "none": all is content
    reasoning_budget: int | None = None  # thinking tokens before </think> is forced; None: no limit
    prefix_cache_mb: float = 512.0  # prefix-state cache budget (MiB); 0 turns it off
    prefill_chunk: int = 256  # prompt tokens prefilled per scheduler iteration, between decode steps
    max_request_bytes: int = 1 << 20
    shutdown_timeout: float = 10.0
    access_log: bool = True
    load_delay: float = 0.0  # testing: seconds to wait before loading

    def check(self) -> None:
        """Raise SambayError, naming the flag, on a value the server cannot run with."""
        for name in ("max_batch_size", "max_tokens", "max_request_bytes", "prefill_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SambayError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise SambayError(f"--prefix-cache-mb must be 0 (off) or more, got {self.prefix_cache_mb}")
        if self.max_queue < 0:
            raise SambayError(f"--max-queue must be 0 or more, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SambayError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise SambayError(f"--port must be in 0..65535, got {self.port}")
        # Values from the environment skip argparse's `choices` check.
        if self.reasoning_budget is not None and self.reasoning_budget < 0:
            raise SambayError(f"--reasoning-budget must be 0 or more, got {self.reasoning_budget}")
        for name, allowed in (("dtype", ("float32", "bfloat16")), ("quantize", ("int8",)),
                              ("reasoning_format", ("auto", "none"))):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise SambayError(f"--{name} must be one of {', '.join(allowed)}, got {value!r} "
                                  f"(check SAMBAY_{name.upper()})")

    @property
    def capacity(self) -> int:
        """Jobs the server holds at once: one per batch row plus the queue."""
        return self.max_batch_size + self.max_queue


def served_name(settings: Settings) -> str:
    """The name clients send as "model": --served-model-name, else the model folder's name (or the
    repo id or preset as given), else "default_model" for the embedded model."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model is None:
        return "default_model"
    text = str(settings.model).rstrip("/")
    if Path(os.path.expanduser(text)).is_dir():
        return Path(os.path.expanduser(text)).resolve().name
    return text  # a Hugging Face repo id or a preset name
