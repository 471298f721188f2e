"""The functional API: `generate` on token ids (a batch, like Hugging Face's) and `stream` on text.

    out = sambay.generate(model, input_ids, max_new_tokens=64)
    for piece in sambay.stream(model, tokenizer, "Hello"):
        print(piece, end="")
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from sambay.errors import SambayError
from sambay.runtime.engine import Engine, Stats, check_context, pad_id
from sambay.runtime.sampling import SamplingParams
from sambay.runtime.text import TextStream


def _params(max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, more) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop_token_ids=stop_token_ids, **more).validate()
    except TypeError as e:
        raise SambayError(f"unknown sampling option: {e}") from None


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
             return_stats: bool = False, **more_sampling):
    """Generate from a batch of prompts; returns the new tokens only, LongTensor (B, n).

    input_ids (B, T), optionally left-padded (attention_mask 0 at the padding). Each row stops at
    a stop id (included in its output, as in Hugging Face) or after max_new_tokens; n is the
    longest row's length and shorter rows are filled with the pad id. stop_token_ids None means
    the model's eos ids. Row b samples with seed `seed + b`, so a row's tokens do not depend on
    the rest of the batch. more_sampling: any other SamplingParams field (min_p,
    repetition_penalty, ...). With return_stats, returns (tokens, Stats) instead.
    """
    params = _params(max_new_tokens, temperature, top_p, top_k, seed,
                     None if stop_token_ids is None else [int(i) for i in stop_token_ids], more_sampling)
    if params.stop:
        raise SambayError("stop strings need a tokenizer: use sambay.engine.stream(model, tokenizer, ...) "
                          "or Engine.stream_text; generate() works on token ids (use stop_token_ids)")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise SambayError(f"input_ids must be (batch, tokens), got shape {list(ids.shape)}")
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else \
        torch.as_tensor(attention_mask).to(torch.bool)
    if mask.shape != ids.shape:
        raise SambayError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise SambayError("attention_mask may only mark padding at the start of a row (left padding)")
    prompts = [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]
    longest = max(len(p) for p in prompts)
    check_context(model, longest, params.max_new_tokens)
    engine = Engine(model, max_batch_size=len(prompts), max_length=longest + params.max_new_tokens)
    per_row = [params if params.seed is None else params.replace(seed=params.seed + b)
               for b in range(len(prompts))]
    start = time.perf_counter()
    reqs = engine.run(prompts, per_row)
    width = max(len(r.output_ids) for r in reqs)
    out = torch.full((len(reqs), width), pad_id(model), dtype=torch.long)
    for b, r in enumerate(reqs):
        out[b, :len(r.output_ids)] = torch.tensor(r.output_ids, dtype=torch.long)
    if not return_stats:
        return out
    prefill = sum(r.stats.prefill_seconds for r in reqs)
    stats = Stats(prompt_tokens=sum(len(p) for p in prompts),
                  generated_tokens=sum(len(r.output_ids) for r in reqs), prefill_seconds=prefill,
                  decode_seconds=max(time.perf_counter() - start - prefill, 0.0))
    return out, stats


def stream(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None,
           **sampling) -> TextStream:
    """Stream the reply to one prompt as text: `for piece in stream(model, tok, "Hi"): print(piece)`.
    Give a SamplingParams or its fields as keywords."""
    if params is None:
        try:
            params = SamplingParams(**sampling)
        except TypeError as e:
            raise SambayError(f"unknown sampling option: {e}") from None
    elif sampling:
        params = params.replace(**sampling)
    return Engine(model, tokenizer).stream_text(prompt, params)
