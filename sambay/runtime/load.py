"""The one way every front-end (generate, chat, serve, bench, evals) loads a model for inference.

    model, tokenizer = load_for_inference("path/to/Phi-4-mini-flash-reasoning", quantize="int8")

It resolves what the user typed (a folder, a Hugging Face repo id, a preset, or None for the
embedded default model), loads the weights, prepares the model for fast CPU decoding (packing or
quantizing its linear layers, building or loading the native kernels) and finds its tokenizer.
Progress goes to stderr, so piped output stays clean.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from sambay.errors import SambayError
from sambay.kernels.prepare import prepare_for_inference
from sambay.models import CausalLM
from sambay.runtime.checkpoint import load_model, resolve_model
from sambay.tokenizer import Tokenizer, load_tokenizer

# The smallest vocabulary that holds Phi-4's chat tokens: a preset this large can use its tokenizer.
PHI4_VOCAB = 200029


def load_for_inference(model: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
                       quantize: str | None = None, random_weights: bool = False, seed: int = 0,
                       with_tokenizer: bool = True, quiet: bool = False
                       ) -> tuple[CausalLM, Tokenizer | None]:
    """Load `model` ready to decode: (model, tokenizer), the tokenizer None if not wanted.

    dtype: the weights' dtype (default: the checkpoint's; float32 for a preset). quantize: "int8", "int4"
    or None (keep the weights; an already quantized checkpoint stays as saved). A preset has no
    trained weights, so it needs random_weights=True. quiet: no loading lines on stderr.
    """
    where = resolve_model(model)
    preset = where if isinstance(where, str) else None
    if preset and not random_weights:
        raise SambayError(f"{preset!r} is a preset: it has no trained weights; add --random-weights "
                          f"to run it with random ones, or pass a model folder with --model")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    label = f"preset {preset}" if preset else str(where)
    random = ", random weights" if random_weights and not preset else ""
    _say(quiet, f"loading {label}{random} ...")
    start = time.perf_counter()
    net = load_model(where, dtype=dtype, random_weights=random_weights, seed=seed)
    tokenizer = _tokenizer_for(where, net) if with_tokenizer else None
    net = prepare_for_inference(net, quantize)
    kind = str(net.dtype).removeprefix("torch.") + (f", {quantize}" if quantize else "")
    _say(quiet, f"loaded in {time.perf_counter() - start:.1f} s ({kind})")
    return net, tokenizer


def _tokenizer_for(where, model: CausalLM) -> Tokenizer:
    if isinstance(where, str):  # a preset has no tokenizer files; only the Phi-4 vocabulary fits one
        if model.config.vocab_size < PHI4_VOCAB:
            raise SambayError(f"preset {where!r} has no tokenizer (vocab {model.config.vocab_size}); text "
                              f"generation needs a model folder with tokenizer files")
        return load_tokenizer("phi4")
    return load_tokenizer(where)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)
