"""Byte-level BPE backends: one built from a vocabulary and merges (with added tokens pinned to given
ids), and one trained on our own text for small models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from sambay.errors import SambayError
from sambay.tokenizer.chat import PHI4_CHAT_TEMPLATE, PHI4_EOS
from sambay.tokenizer.wrapper import Tokenizer

# Special tokens of tokenizers we train ourselves; they share the Phi-4 chat format.
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
# As in Phi-4, every special token except these two swallows the whitespace after it.
_NO_RSTRIP = frozenset({"<|endoftext|>", "<|endofprompt|>"})


def added_token(content: str, special: bool, rstrip: bool, lstrip: bool = False,
                normalized: bool = False, single_word: bool = False) -> AddedToken:
    """An AddedToken with every flag explicit: AddedToken's own default `normalized=not special`
    is not what the checkpoints' non-special tokens (<|tool|>, ...) use."""
    return AddedToken(content, special=special, rstrip=rstrip, lstrip=lstrip, normalized=normalized,
                      single_word=single_word)


def byte_level_backend(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added: Iterable[tuple[int, AddedToken]],
    pattern: str | None,
    ignore_merges: bool,
) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with added tokens at the given ids.

    `tokenizers` gives an added token the id the BPE vocabulary has for its text, or else the next
    free id; to pin the ids (the Phi-4 ones leave gaps), they are put into the vocabulary first.
    `pattern` is the pre-tokenizer regex; None means GPT-2's (ByteLevel's own).
    """
    added = list(added)
    vocab = dict(vocab)
    for token_id, token in added:
        vocab[token.content] = token_id
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    if pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([token for _, token in added])
    for token_id, token in added:
        if backend.token_to_id(token.content) != token_id:  # would mean `tokenizers` changed rules
            raise RuntimeError(f"added token {token.content!r} got id {backend.token_to_id(token.content)}, "
                               f"not {token_id}")
    return backend


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS
) -> Tokenizer:
    """Train a byte-level BPE on `texts` for our own small models.

    The special tokens come first (ids 0, 1, ...), then the 256 bytes, then the merges. Like
    Phi-4's, every special token but <|endoftext|>/<|endofprompt|> swallows the whitespace after
    it, and the chat template is Phi-4's, so small models share the Phi-4 chat format.
    """
    special_tokens = list(dict.fromkeys([PHI4_EOS, *special_tokens]))
    if vocab_size < 256 + len(special_tokens):
        raise SambayError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                          f"{256 + len(special_tokens)} (256 bytes + {len(special_tokens)} special tokens)")
    added = [added_token(t, special=True, rstrip=t not in _NO_RSTRIP) for t in special_tokens]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(
        backend,
        chat_template=PHI4_CHAT_TEMPLATE,
        bos_token=PHI4_EOS,
        eos_token=PHI4_EOS,
        pad_token=PHI4_EOS,
        unk_token=PHI4_EOS,
    )
