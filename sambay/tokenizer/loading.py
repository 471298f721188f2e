"""Loading a tokenizer from a checkpoint folder, in the layouts Hugging Face checkpoints use.

tokenizer.json is the authority when present; otherwise vocab.json + merges.txt (GPT-2 style) with
the added tokens of tokenizer_config.json / added_tokens.json at the ids the config gives them; a
Phi-4-mini-flash checkpoint without tokenizer files gets the built-in Phi-4 tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from sambay.errors import SambayError
from sambay.files import read_json
from sambay.tokenizer.bpe import added_token, byte_level_backend
from sambay.tokenizer.chat import PHI4_EOS
from sambay.tokenizer.phi4 import O200K_PATTERN, looks_like_o200k, phi4_tokenizer
from sambay.tokenizer.wrapper import Tokenizer


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "..." or as {"content": "...", ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_phi4_config(folder: Path) -> bool:
    config = read_json(folder / "config.json")
    return isinstance(config, dict) and config.get("model_type") == "phi4flash" and config.get("vocab_size") == 200064


def _config_added_tokens(folder: Path, config: Mapping[str, Any]) -> dict[int, AddedToken]:
    """Added tokens from tokenizer_config.json's added_tokens_decoder, then added_tokens.json."""
    added: dict[int, AddedToken] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        added[int(key)] = added_token(
            entry["content"],
            special=bool(entry.get("special", False)),
            rstrip=bool(entry.get("rstrip", False)),
            lstrip=bool(entry.get("lstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            single_word=bool(entry.get("single_word", False)),
        )
    known = {t.content for t in added.values()}
    for content, token_id in (read_json(folder / "added_tokens.json") or {}).items():
        if content not in known and int(token_id) not in added:
            added[int(token_id)] = added_token(content, special=False, rstrip=False)
    return added


def _backend_from_vocab_merges(folder: Path, config: Mapping[str, Any]) -> tokenizers.Tokenizer:
    vocab = read_json(folder / "vocab.json")
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
    o200k = looks_like_o200k(vocab)
    try:
        return byte_level_backend(vocab, merges, sorted(added.items()), O200K_PATTERN if o200k else None,
                                  ignore_merges=o200k)
    except Exception as exc:  # noqa: BLE001 - `tokenizers` raises a bare Exception
        raise SambayError(f"vocab.json and merges.txt in {folder} do not fit together ({exc}); restore "
                          "them from the original checkpoint") from exc


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = (read_json(folder / "chat_template.json") or {}).get("chat_template")
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
        # Imported here, not at the top: the runtime layer imports the tokenizer (runtime.load), so a
        # module-level import back into sambay.runtime would make the two packages a cycle.
        from sambay.runtime.checkpoint import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR
    if str(path) == "phi4":
        return phi4_tokenizer()
    folder = Path(path)
    if folder.is_file() and folder.name == "tokenizer.json":
        folder = folder.parent
    if not folder.is_dir():
        raise SambayError(f"tokenizer folder {folder} does not exist; pass a checkpoint folder or 'phi4'")
    config = read_json(folder / "tokenizer_config.json") or {}
    special_map = read_json(folder / "special_tokens_map.json") or {}

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
