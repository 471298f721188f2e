"""The Tokenizer: a `tokenizers.Tokenizer` plus what a chat model needs on top of it.

The Hugging Face `tokenizers` backend does the byte-level BPE; this adds the chat template, the stop
ids and the special-token strings of `tokenizer_config.json`, and writes a folder both
`load_tokenizer` and transformers' AutoTokenizer read back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from sambay.errors import SambayError
from sambay.files import atomic_path, atomic_write_text
from sambay.tokenizer.chat import END_OF_TURN, PHI4_CHAT_TEMPLATE, check_messages, compile_template, render_chat
from sambay.tokenizer.stream import StreamDecoder


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
        check_messages(messages)
        source = self._template_for(tools)
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = compile_template(source)
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            **kwargs,
        }
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           documents=documents, variables=variables)

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
