"""How much a weight format costs in quality, measured against the unquantized model on held-out text.

For each format the model is quantized as `--quantize` would (sambay.kernels.quantize_model, the
native kernels' own arithmetic, int8 activations included) and run over the same windows of tokens
as the float32 model; per next-token position we compare the two distributions: mean KL(float ||
quantized), top-1 agreement, and each model's perplexity. Round-to-nearest absmax 4-bit with groups
of 32 (int4 rtn-g32) is the baseline a 4-bit format must beat.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from sambay.errors import SambayError
from sambay.kernels.prepare import prepare_for_inference, quantize_model
from sambay.quant.int4 import DEFAULT_FORMAT, INT8_LAYERS, Int4Format

# "int8", or "int4:<format>[:<layer>+<layer>...]" where the layers are the ones kept at int8
# (by name or last name part; none for "-"). The default list covers the choices docs/benchmarks.md
# reports; the default int4 (DEFAULT_FORMAT, INT8_LAYERS) is among them.
FORMATS = ("int8", "int4:rtn-g32", "int4:sym-g32", "int4:asym-g32", "int4:sym-g64", "int4:asym-g64",
           "int4:asym-g128", "int4:asym-g32:lm_head+fc2", "int4:asym-g32:-")


@dataclass
class QuantQuality:
    format: str
    kl: float          # mean KL(float || quantized) per next-token distribution, nats
    top1: float        # fraction of positions whose most likely next token is the same
    ppl: float         # the quantized model's perplexity on the text
    ppl_change: float  # relative to the float model's, e.g. 0.02 = +2%


def parse_format(spec: str) -> tuple[str, Int4Format, tuple[str, ...]]:
    parts = spec.split(":")
    if parts[0] == "int8" and len(parts) == 1:
        return "int8", DEFAULT_FORMAT, ()
    if parts[0] != "int4" or len(parts) not in (2, 3):
        raise SambayError(f"unknown format {spec!r}; use int8 or int4:<fmt>[:<layers kept int8, + separated, or ->]")
    layers = INT8_LAYERS if len(parts) == 2 else tuple(p for p in parts[2].split("+") if p and p != "-")
    return "int4", Int4Format.parse(parts[1]), layers


def windows(ids: list[int], window: int, max_tokens: int) -> list[torch.Tensor]:
    """The text's tokens in non-overlapping windows of `window` (the last partial one dropped)."""
    ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise SambayError(f"the text has {len(ids)} tokens, fewer than one window of {window}; give more text "
                          f"or a smaller --window")
    return [torch.tensor(ids[i * window:(i + 1) * window]).unsqueeze(0) for i in range(n)]


@torch.no_grad()
def _logprobs(model, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(c).float()[0, :-1], dim=-1) for c in chunks]


def _nll(logp: list[torch.Tensor], chunks: list[torch.Tensor]) -> float:
    tot = sum(-lp.gather(1, c[0, 1:, None]).sum().item() for lp, c in zip(logp, chunks))
    return tot / sum(c.shape[1] - 1 for c in chunks)


@torch.no_grad()
def evaluate(model, ids: list[int], formats=FORMATS, window: int = 256, max_tokens: int = 4096,
             progress=None) -> tuple[float, list[QuantQuality]]:
    """model: an unprepared float model (runtime.load_model); returns the float model's perplexity
    and one QuantQuality per format."""
    chunks = windows(ids, window, max_tokens)
    ref = _logprobs(prepare_for_inference(copy.deepcopy(model)), chunks)
    ref_nll = _nll(ref, chunks)
    out = []
    for spec in formats:
        mode, fmt, layers = parse_format(spec)
        q = prepare_for_inference(quantize_model(copy.deepcopy(model), mode, fmt, layers))
        lp = _logprobs(q, chunks)
        kl = sum((r.exp() * (r - p)).sum().item() for r, p in zip(ref, lp)) / sum(r.shape[0] for r in ref)
        top1 = sum((r.argmax(-1) == p.argmax(-1)).sum().item() for r, p in zip(ref, lp)) / sum(r.shape[0] for r in ref)
        nll = _nll(lp, chunks)
        out.append(QuantQuality(spec, kl, top1, math.exp(nll), math.exp(nll - ref_nll) - 1))
        del q
        if progress is not None:
            progress(spec)
    return math.exp(ref_nll), out


def table(ppl: float, rows: list[QuantQuality]) -> str:
    lines = [f"float32 perplexity {ppl:.3f}", f"{'format':<28} {'mean KL':>9} {'top-1':>7} {'ppl':>9} {'ppl change':>10}"]
    lines += [f"{r.format:<28} {r.kl:9.5f} {r.top1:7.2%} {r.ppl:9.3f} {r.ppl_change:+10.2%}" for r in rows]
    return "\n".join(lines)
