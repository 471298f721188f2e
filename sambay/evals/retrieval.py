"""What the two long-context retrieval evals (phonebook, needle) share.

Both build a prompt that holds one fact among many filler items, grown until it is as long as
asked in the model's own tokens (never longer), ask for the fact with greedy decoding, and score
the first line of the answer. What differs is the filler, the fact and the match rule, so each eval
is a `build(n) -> prompt` function of the number of filler items plus a `correct(text, answer)`.

Token counts are measured with the tokenizer, not estimated: the same text is 2-3x more tokens with
a 4K byte-level vocabulary than with Phi-4's 200K one, and "a 32K-token phonebook" must mean the
same difficulty for the model being tested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sambay.errors import SambayError
from sambay.runtime.sampling import SamplingParams
from sambay.evals.generation import GenerateFn


@dataclass
class Sample:
    """One retrieval question: the prompt, the expected answer, and where it came from."""

    prompt: str
    answer: str
    prompt_tokens: int
    length: int  # the asked context length (prompt_tokens <= length)
    depth: float | None = None  # needle only: where the fact sits, 0 = start, 1 = end
    items: int = 0  # filler items (phonebook entries, haystack sentences) in the prompt


def fit_to_budget(build: Callable[[int], str], count_tokens: Callable[[str], int], budget: int,
                  lowest: int, highest: int, what: str) -> tuple[int, str, int]:
    """The largest n in [lowest, highest] whose prompt build(n) is at most `budget` tokens.

    A binary search: the token count grows with n (up to the few tokens by which the chosen
    fact's own text varies), so the result always fits and is within an item or two of full.
    Returns (n, prompt, tokens).
    """
    prompt = build(lowest)
    tokens = count_tokens(prompt)
    if tokens > budget:
        raise SambayError(f"a context length of {budget} tokens is too short: the smallest {what} prompt "
                          f"({lowest} items) is already {tokens} tokens; ask for longer --lengths")
    best = (lowest, prompt, tokens)
    lo, hi = lowest + 1, highest
    while lo <= hi:
        mid = (lo + hi) // 2
        prompt = build(mid)
        tokens = count_tokens(prompt)
        if tokens <= budget:
            best = (mid, prompt, tokens)
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def check_lengths(lengths: Sequence[int], max_new_tokens: int, context: int) -> None:
    """Refuse context lengths the model cannot hold (prompt + answer)."""
    for n in lengths:
        if n < 1:
            raise SambayError(f"--lengths must be positive token counts, got {n}")
        if n + max_new_tokens > context:
            raise SambayError(f"context length {n} + --max-new-tokens {max_new_tokens} is beyond the "
                              f"model's context of {context} tokens; use --lengths up to "
                              f"{context - max_new_tokens}")


def run(samples: Sequence[Sample], generate: GenerateFn, max_new_tokens: int,
        correct: Callable[[str, str], bool], progress=None) -> list[bool]:
    """Ask every sample greedily (stopping at the first newline); one bool per sample."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    results: list[bool | None] = [None] * len(samples)
    for i, text in generate([s.prompt for s in samples], [params] * len(samples)):
        results[i] = correct(text, samples[i].answer)
        if progress is not None:
            progress.update(1)
    if any(r is None for r in results):
        raise RuntimeError("the generate function skipped some prompts")  # a bug, not a user error
    return results


def summarize(samples: Sequence[Sample], results: Sequence[bool], by: Iterable[str]) -> list[dict]:
    """Accuracy per group of samples with equal `by` fields (e.g. ("length",) or ("length", "depth")),
    in first-seen order: {**group, "samples", "correct", "accuracy", "prompt_tokens" (mean)}."""
    by = tuple(by)
    groups: dict[tuple, list[tuple[Sample, bool]]] = {}
    for s, ok in zip(samples, results):
        groups.setdefault(tuple(getattr(s, k) for k in by), []).append((s, ok))
    rows = []
    for key, members in groups.items():
        n = len(members)
        hits = sum(ok for _, ok in members)
        rows.append({**dict(zip(by, key)), "samples": n, "correct": hits, "accuracy": hits / n,
                     "prompt_tokens": round(sum(s.prompt_tokens for s, _ in members) / n, 1)})
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A plain aligned table; columns are (key, header). Accuracy is shown in percent."""
    def cell(row: dict, key: str) -> str:
        value = row[key]
        if key == "accuracy":
            return f"{100 * value:.1f}%"
        return str(value)

    body = [[cell(r, k) for k, _ in columns] for r in rows]
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
