"""Choosing the next token: sampling parameters, penalties, the top-k / top-p / min-p filters.

Everything works on a batch of logits (B, V) with one `SamplingParams` per row, so requests with
different settings share one decode step. Each request samples with its own seeded
`torch.Generator`, so its tokens depend only on its seed and its own logits, never on which other
requests happen to share the batch.

The order of operations is Hugging Face's: penalties, then temperature, top-k, top-p, min-p.
`filter_mask_ref` is the slow, obviously-right version of the three filters; the tests hold the
vectorized `filter_mask` equal to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sambay.errors import SambayError


@dataclass
class SamplingParams:
    """How one request picks its tokens. The defaults are greedy decoding of up to 256 tokens.

    temperature 0 means greedy (argmax). top_k 0, top_p 1 and min_p 0 switch those filters off.
    repetition_penalty follows Hugging Face (divide positive logits, multiply negative ones, for
    every id already in the prompt or the output); presence_penalty and frequency_penalty follow
    OpenAI (subtract `presence * [count > 0] + frequency * count`, counting generated ids only).
    stop_token_ids None means the model's end-of-sequence ids; [] means never stop on an id.
    `stop` strings are honoured by the text layer (it needs a tokenizer). `logprobs` N asks for the
    log-probability of each chosen token plus the N most likely alternatives (0: the chosen only),
    taken from the model's raw distribution, before penalties and temperature.
    `grammar` (e.g. sambay.serve.structured.Grammar) constrains the output: anything with
    `new_matcher()`, whose matcher masks the row's logits before sampling (`mask_logits(row)`) and
    follows each chosen token (`accept(id)`); the engine makes one matcher per request.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    grammar: Any = None

    def validate(self) -> SamplingParams:
        """Raise SambayError naming the first bad field; return self so calls can be chained."""
        def bad(msg: str) -> SambayError:
            return SambayError(f"invalid sampling parameter: {msg}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{name} must be a finite number, got {value!r}")
            return value

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if number("temperature") < 0:
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < number("top_p") <= 1:
            raise bad(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            raise bad(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if number("repetition_penalty") <= 0:
            raise bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.stop_token_ids is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            raise bad(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise bad(f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}")
        return self

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def make_generator(self) -> torch.Generator | None:
        """The request's own random stream: seeded if `seed` is set, else from the OS. None if greedy."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


# The sampling fields a checkpoint's generation_config.json may set.
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(generation_config: dict | None) -> dict[str, float]:
    """The sampling defaults a checkpoint recommends (Phi-4-mini-flash: temperature 0.6, top_p 0.95):
    its generation_config.json's numeric sampling fields, or greedy when it says do_sample false.
    Every front-end applies these to the fields a user leaves out."""
    gen = dict(generation_config or {})
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    return {k: gen[k] for k in GENERATION_FIELDS
            if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}


class TokenCounts:
    """What the penalties know about one sequence: which ids its prompt holds, how often each id
    was generated. Two (V,) tensors; made only for requests that use a penalty."""

    def __init__(self, vocab_size: int, prompt_ids: Sequence[int] | torch.Tensor = ()):
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool)
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        if ids.numel():
            self.in_prompt[ids] = True
        self.generated = torch.zeros(vocab_size, dtype=torch.int32)

    def add(self, token_id: int) -> None:
        self.generated[token_id] += 1


# ---------------------------------------------------------------------------------------------
# Penalties and filters
# ---------------------------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, params: SamplingParams, counts: TokenCounts) -> torch.Tensor:
    """One row (V,) -> penalized copy."""
    out = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = counts.in_prompt | (counts.generated > 0)
        p = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if params.presence_penalty or params.frequency_penalty:
        n = counts.generated.float()
        out = out - params.frequency_penalty * n - params.presence_penalty * (n > 0).float()
    return out


def filter_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> torch.Tensor:
    """Which tokens survive top-k, then top-p, then min-p. logits (B, V) already divided by the
    temperature; top_k (B,) long (0 = off), top_p and min_p (B,) float. Returns keep (B, V) bool.

    top-k keeps the k most likely ids (ties broken by the lower id); top-p keeps the smallest
    most-likely-first set whose probability (after top-k) reaches p; min-p keeps ids whose
    probability is at least min_p times the most likely one's. The top id always survives.
    """
    B, V = logits.shape
    keep = torch.ones(B, V, dtype=torch.bool, device=logits.device)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        keep, decided = _top_k_top_p(logits, top_k, top_p, min(V, CANDIDATES))
        if not bool(decided.all()):  # some row's kept set reaches past the candidates: sort it whole
            rows = torch.nonzero(~decided).flatten()
            keep[rows] = _top_k_top_p(logits[rows], top_k[rows], top_p[rows], V)[0]
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        keep &= probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return keep


# Top-k and top-p sort only the most likely ids when those decide the row: a stable sort of
# Phi-4's 200,064 logits takes about 20 ms on a 2-core CPU, the top 1,024 about 1 ms.
CANDIDATES = 1024


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, n: int):
    """filter_mask's top-k and top-p over the n largest logits of each row, ordered as a stable
    descending sort of the whole row orders them (equal logits: the lower id first). Returns keep
    (B, V) and decided (B,): whether the row's kept set ends inside the candidates, strictly above
    the smallest of them (so that no id left out ties with a kept one); n = V decides every row."""
    B, V = logits.shape
    if n == V:
        vals, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    else:  # the candidates by id, then stably by logit: ties keep the lower id first
        vals, ids = torch.topk(logits, n, dim=-1)
        ids, pos = torch.sort(ids, dim=-1)
        vals, order = torch.sort(vals.gather(1, pos), dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
    rank = torch.arange(n, device=logits.device).expand(B, n)
    keep_sorted = rank < torch.where(top_k > 0, top_k, V).unsqueeze(1)
    masked = vals.masked_fill(~keep_sorted, -math.inf)
    # probabilities after top-k: over the kept top k, or over the whole row
    within = (top_k > 0) & (top_k <= n)
    log_total = torch.where(within, torch.logsumexp(masked, dim=-1), torch.logsumexp(logits, dim=-1))
    probs = torch.exp(masked - log_total.unsqueeze(1))
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely ids
    keep_sorted &= (before < top_p.unsqueeze(1)) | (rank == 0)
    last = vals.gather(1, keep_sorted.sum(dim=-1, keepdim=True) - 1).squeeze(1)  # kept ranks: a prefix
    # a top k larger than n normalizes over ids past the candidates: such a row needs n = V
    decided = torch.full((B,), n == V, device=logits.device) | (last > vals[:, -1]) & (top_k <= n)
    keep = torch.zeros(B, V, dtype=torch.bool, device=logits.device).scatter(1, ids, keep_sorted)
    return keep, decided


def filter_mask_ref(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Reference for one row (V,): the three filters as plain Python over a sorted list."""
    values = [float(x) for x in logits]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1:
        m = max(values[i] for i in kept)
        weights = {i: math.exp(values[i] - m) for i in kept}
        total = sum(weights.values())
        nucleus, mass = [], 0.0
        for i in kept:
            nucleus.append(i)
            mass += weights[i] / total
            if mass >= top_p:
                break
        kept = nucleus
    if min_p > 0:
        m = max(values)
        kept = [i for i in kept if math.exp(values[i] - m) >= min_p]
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[kept] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           counts: Sequence[TokenCounts | None] | None = None,
           matchers: Sequence[Any] | None = None) -> torch.Tensor:
    """Pick one id per row. logits (B, V); params, generators, counts, matchers: one entry per row
    (a penalized row needs its TokenCounts; a sampled row without a generator uses a fresh one; a
    row with a grammar matcher samples only among the ids it allows, after the penalties, and the
    rows without one are not touched). Returns ids (B,) long."""
    B, V = logits.shape
    if len(params) != B:
        raise ValueError(f"{len(params)} SamplingParams for {B} rows of logits")
    x = logits.float()
    if any(p.penalized for p in params):
        x = x.clone()
        for b, p in enumerate(params):
            if p.penalized:
                if counts is None or counts[b] is None:
                    raise ValueError(f"row {b} uses a penalty but has no TokenCounts")
                x[b] = apply_penalties(x[b], p, counts[b])
    if matchers is not None and any(m is not None for m in matchers):
        if x is logits:
            x = x.clone()  # the caller's logits stay raw (logprobs are taken from them)
        for b, m in enumerate(matchers):
            if m is not None:
                m.mask_logits(x[b])
    ids = x.argmax(dim=-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return ids
    sel = torch.tensor(rows)
    temp = torch.tensor([params[b].temperature for b in rows], dtype=torch.float32)
    scaled = x[sel] / temp.unsqueeze(1)
    keep = filter_mask(
        scaled,
        torch.tensor([params[b].top_k for b in rows], dtype=torch.long),
        torch.tensor([params[b].top_p for b in rows], dtype=torch.float32),
        torch.tensor([params[b].min_p for b in rows], dtype=torch.float32),
    )
    for j, b in enumerate(rows):
        g = generators[b] if generators is not None else None
        if g is None:
            g = params[b].make_generator()
        kept = torch.nonzero(keep[j]).flatten()  # draw among the survivors only: a few ids, not the vocabulary
        ids[b] = kept[torch.multinomial(torch.softmax(scaled[j, kept], dim=-1), 1, generator=g)[0]]
    return ids


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, top: int = 0):
    """Log-probabilities under the raw distribution. logits (B, V), ids (B,).
    Returns (chosen (B,), top_ids (B, top), top_logprobs (B, top))."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, ids.unsqueeze(1)).squeeze(1)
    values, top_ids = logp.topk(top, dim=-1) if top else (logp[:, :0], ids.new_zeros(len(ids), 0))
    return chosen, top_ids, values
