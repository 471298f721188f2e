"""Single-needle retrieval in the style of RULER's niah_single (Hsieh et al. 2024, arXiv 2404.06654).

One sentence, "The special magic number for <key> is: <7 digits>.", is put at a chosen depth (0 =
the start of the haystack, 1 = its end) among filler sentences, and the model is asked for the
number:

    Some special magic numbers are hidden within the following text. Make sure to memorize them.
    I will quiz you about the numbers afterwards.
    <filler ... The special magic number for quiet-harbor is: 4071925. ... filler>
    What is the special magic number for quiet-harbor mentioned in the provided text? The special
    magic number for quiet-harbor mentioned in the provided text is

Greedy decoding; a sample is right when the number appears in the first line of the output.
Unlike the phonebook, the filler carries no competing facts, so this measures whether a fact
survives the distance at all; the per-depth table shows where in the context it gets lost.

The filler is a few dozen plain sentences written for this project (no copyrighted text),
shuffled and repeated; all randomness comes from a `random.Random` seeded by (seed, length, depth,
sample index).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from sambay.evals.generation import first_line
from sambay.evals.retrieval import Sample, fit_to_budget

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
         "I will quiz you about the numbers afterwards.")
NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")

FILLER = (
    "The morning train left the station a few minutes after the bell rang.",
    "A small boat drifted slowly along the edge of the quiet lake.",
    "Most of the shops on the main street close early on Sundays.",
    "The library keeps its old maps in a cool room on the second floor.",
    "Rain had fallen all night, and the paths in the park were soft underfoot.",
    "She wrote the list of groceries on the back of an envelope.",
    "The bakery on the corner sells fresh bread until noon.",
    "Two children were flying a red kite above the open field.",
    "The clock in the hall runs a little fast in the summer.",
    "A line of ants carried crumbs across the kitchen floor.",
    "The bridge over the river was painted green last spring.",
    "He kept his bicycle in the shed behind the house.",
    "The museum added a new room for old musical instruments.",
    "Snow covered the hills long before it reached the town.",
    "The farmer checked the fences after the storm had passed.",
    "A gentle wind moved the curtains of the open window.",
    "The teacher asked the class to read the next chapter at home.",
    "Several boxes of books were waiting by the front door.",
    "The road to the village climbs slowly through the pine forest.",
    "A cat slept in the warm patch of sun on the stairs.",
    "The market opens at dawn, when the fishing boats come back.",
    "Someone had left a blue umbrella on the bench by the bus stop.",
    "The lighthouse has guided ships along this coast for a long time.",
    "Tea was served in the garden while the band played.",
    "The old mill still turns when the stream is high.",
    "Every evening the neighbors walk their dogs along the canal.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "A flock of geese passed overhead, flying south in a long line.",
    "The painter mixed a new shade of yellow for the sunflowers.",
    "The hotel lobby was full of travelers waiting for the rain to stop.",
    "Fresh strawberries were piled high on the stall at the market.",
    "The orchestra tuned their instruments before the concert began.",
)
KEY_WORDS = (
    ("quiet", "bright", "amber", "silver", "hidden", "gentle", "rapid", "ancient", "golden", "hollow",
     "crimson", "distant", "frozen", "humble", "lively", "mellow"),
    ("harbor", "meadow", "lantern", "falcon", "orchard", "canyon", "violin", "compass", "glacier",
     "pebble", "thistle", "beacon", "willow", "saddle", "harvest", "ribbon"),
)
MIN_TOKENS_PER_SENTENCE = 5


def haystack(rng: random.Random, n: int) -> list[str]:
    """n filler sentences: the filler reshuffled each time round, so no fixed period to latch onto."""
    out: list[str] = []
    while len(out) < n:
        round_ = list(FILLER)
        rng.shuffle(round_)
        out += round_
    return out[:n]


def format_prompt(sentences: Sequence[str], depth: float, key: str, value: str) -> str:
    """The haystack with the needle after round(depth * n) of its n sentences, and the question."""
    at = round(depth * len(sentences))
    body = [*sentences[:at], NEEDLE.format(key=key, value=value), *sentences[at:]]
    return f"{INTRO}\n{' '.join(body)}\n{QUESTION.format(key=key)}"


def make_sample(tokenizer, length: int, depth: float, seed: int, index: int) -> Sample:
    """The index-th haystack of `length` tokens (never more) with the needle at `depth`."""
    rng = random.Random(f"needle:{seed}:{length}:{depth}:{index}")
    key = f"{rng.choice(KEY_WORDS[0])}-{rng.choice(KEY_WORDS[1])}"
    value = str(rng.randrange(10**6, 10**7))  # 7 digits
    sentences = haystack(rng, length // MIN_TOKENS_PER_SENTENCE + 1)
    n, prompt, tokens = fit_to_budget(lambda n: format_prompt(sentences[:n], depth, key, value),
                                      lambda text: len(tokenizer.encode(text)), length,
                                      lowest=0, highest=len(sentences), what="needle")
    return Sample(prompt=prompt, answer=value, prompt_tokens=tokens, length=length, depth=depth, items=n)


def make_samples(tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int,
                 seed: int) -> list[Sample]:
    return [make_sample(tokenizer, length, depth, seed, i)
            for length in lengths for depth in depths for i in range(samples)]


def is_correct(output: str, answer: str) -> bool:
    """The number appears in the first line of the output."""
    return answer in first_line(output)
