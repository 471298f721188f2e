"""The Phonebook retrieval test of "Repeat After Me" (Jelassi et al. 2024, arXiv 2402.01032).

A book of made-up entries, then two example lookups and a query, exactly as in SPEC.md section 7:

    Mary Hayes: 7425319806          one line per entry: a unique "First Last" name and a
    Kevin Ortiz: 6093317452         10-digit number whose first digit is 6-9
    ...
                                    (blank line)
    Kevin Ortiz: 6093317452         two example lookups of names from the book
    Mary Hayes: 7425319806
                                    (blank line)
    Paul Soto:                      the query, a third name from the book

Decoding is greedy; a sample is right when the first line of the output, stripped, is exactly the
number. The numbers are random, so only a model that can look back at any entry of its context
(not one that compresses it into a fixed state) answers well at long lengths; that is the point of
SambaY's one full-attention layer, whose K/V the cross-decoder reads (SPEC.md section 7 gives 92%
at 32K for SambaY and 61% for a Transformer++).

Names come from `names.txt` (200 given names x 204 surnames = 40,800 unique pairs, enough for a
256K-token book with Phi-4's tokenizer). Everything random is drawn from a `random.Random` seeded by
(seed, length, sample index), so a sample does not change when other lengths or counts do.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path

from sambay.evals.generation import first_line
from sambay.evals.retrieval import Sample, fit_to_budget

NAMES_FILE = Path(__file__).with_name("names.txt")
MIN_TOKENS_PER_ENTRY = 3  # name, separator, digits: bounds how many entries a budget can hold


@functools.cache
def name_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(given names, surnames) from names.txt: its [given] and [family] sections."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in NAMES_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None:
            current.append(line)
    return tuple(sections["given"]), tuple(sections["family"])


def random_number(rng: random.Random) -> str:
    """10 digits, the first one 6-9 (the paper's format)."""
    return f"{rng.randint(6, 9)}{rng.randrange(10**9):09d}"


def random_entries(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n entries with unique "First Last" names and unique numbers."""
    given, family = name_lists()
    n = min(n, len(given) * len(family))
    numbers: set[str] = set()
    entries = []
    for k in rng.sample(range(len(given) * len(family)), n):
        number = random_number(rng)
        while number in numbers:
            number = random_number(rng)
        numbers.add(number)
        entries.append((f"{given[k // len(family)]} {family[k % len(family)]}", number))
    return entries


def positions(fractions: Sequence[float], n: int) -> list[int]:
    """Distinct entry indices in [0, n) at the given fractions of the book (collisions move on)."""
    taken: list[int] = []
    for f in fractions:
        i = min(int(f * n), n - 1)
        while i in taken:
            i = (i + 1) % n
        taken.append(i)
    return taken


def format_prompt(entries: Sequence[tuple[str, str]], example_a: int, example_b: int, query: int) -> str:
    """The book, two example lookups and the query, in the exact format of SPEC.md section 7."""
    book = "\n".join(f"{name}: {number}" for name, number in entries)
    (name_a, number_a), (name_b, number_b) = entries[example_a], entries[example_b]
    return f"{book}\n\n{name_a}: {number_a}\n{name_b}: {number_b}\n\n{entries[query][0]}:"


def make_sample(tokenizer, length: int, seed: int, index: int) -> Sample:
    """The index-th phonebook of `length` tokens: as many entries as fit, never more tokens."""
    rng = random.Random(f"phonebook:{seed}:{length}:{index}")
    entries = random_entries(rng, length // MIN_TOKENS_PER_ENTRY + 3)
    fractions = [rng.random() for _ in range(3)]  # where the examples and the query sit

    def build(n: int) -> str:
        return format_prompt(entries[:n], *positions(fractions, n))

    n, prompt, tokens = fit_to_budget(build, lambda text: len(tokenizer.encode(text)), length,
                                      lowest=3, highest=len(entries), what="phonebook")
    query = positions(fractions, n)[2]
    return Sample(prompt=prompt, answer=entries[query][1], prompt_tokens=tokens, length=length, items=n)


def make_samples(tokenizer, lengths: Sequence[int], samples: int, seed: int) -> list[Sample]:
    return [make_sample(tokenizer, length, seed, i) for length in lengths for i in range(samples)]


def is_correct(output: str, answer: str) -> bool:
    """The first line of the output, stripped, is exactly the number."""
    return first_line(output).strip() == answer
