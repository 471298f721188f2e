"""Training data: text files -> token shards on disk -> packed batches.

* `prepare(inputs, tokenizer, out_dir)` reads text (.txt/.md: one document per file; .jsonl: one
  document per line, in its "text" field), tokenizes it, puts an end-of-text token after every
  document and writes the token stream as numpy `.npy` shards (uint16 when the vocabulary fits,
  else uint32) plus `manifest.json`. A small, evenly spread part of the stream is set aside as the
  validation split. Everything is written into a temporary folder next to `out_dir` and renamed
  at the end, so an interrupted run leaves nothing half-written.
* `TokenDataset(out_dir)` opens the shards lazily with memory maps and serves batches of packed
  fixed-length sequences. The global batch of training step s depends only on (seed, s), so a run
  resumed at `start_step` sees exactly what an uninterrupted run would have, and each rank of a
  data-parallel run takes its own disjoint rows of that global batch.
* Files of the built-in public-domain corpora (`sambay.corpus`, e.g. `builtin_corpus("classics")`)
  are recognised by `resolve_sources` and cleaned as they are read.
* `register(subparsers)` adds `sambay prepare`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sambay.train.corpus import (BUILTIN_CORPORA, DEFAULT_BUILTIN, PACKAGES, CorpusPackage, builtin_corpus, builtin_info,
                     builtin_kind, builtin_targets, clean_play_markdown)
from sambay.errors import SambayError

FORMAT = "sambay-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIRNAME = "tokenizer"
SPLITS = ("train", "val")

DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB per uint16 shard
DEFAULT_VAL_FRACTION = 0.005
VAL_CHUNK_TOKENS = 1024  # the validation split is taken as chunks of about this many tokens ...
MAX_VAL_CHUNKS = 64  # ... spread evenly over the corpus, at most this many
_ENCODE_PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about 1 Mi characters
_ENCODE_BATCH_CHARS = 1 << 22  # documents are encoded in batches of about 4 Mi characters
_FLUSH_TOKENS = 1 << 20
_COPY_TOKENS = 1 << 23

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ""}
JSONL_SUFFIXES = {".jsonl"}


# ==== reading inputs ================================================================================


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file and how to read it: "text", "jsonl", or a built-in corpus kind."""

    path: Path
    kind: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _kind_of(path: Path, targets: list[tuple[CorpusPackage, Path]]) -> str:
    builtin = builtin_kind(path, targets)
    if builtin:
        return builtin
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise SambayError(f"{path}: unsupported file type {path.suffix!r}; give plain text (.txt, .md: one "
                      "document per file) or JSON lines (.jsonl, a 'text' field on every line)")


def resolve_sources(inputs: Iterable[str | os.PathLike | Source]) -> list[Source]:
    """Check the inputs and say how to read each one; folders give their .txt/.md/.jsonl files.

    Raises SambayError for a missing path, an unsupported file type, no inputs at all, or inputs
    that are all empty files.
    """
    sources: list[Source] = []
    targets = builtin_targets()
    for item in inputs:
        if isinstance(item, Source):
            sources.append(item)
            continue
        path = Path(item)
        if not path.exists():
            raise SambayError(f"input {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in (TEXT_SUFFIXES | JSONL_SUFFIXES) - {""})
            if not found:
                raise SambayError(f"input folder {path} holds no .txt, .md or .jsonl files")
            sources.extend(Source(p, _kind_of(p, targets)) for p in found)
        else:
            sources.append(Source(path, _kind_of(path, targets)))
    if not sources:
        raise SambayError("no input files given")
    for source in sources:
        if not source.path.is_file():
            raise SambayError(f"input {source.path} does not exist")
    if sum(s.size for s in sources) == 0:
        raise SambayError("the corpus is empty: every input file has 0 bytes")
    return sources


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SambayError(f"{where}: not valid UTF-8 text ({e.reason} at byte {e.start}); "
                          "convert the file to UTF-8") from e


def _jsonl_record(line: bytes, where: str) -> dict[str, Any]:
    """The JSON object of a line, checked to have a string "text" field."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SambayError(f"{where}: not a valid JSON line ({e})") from e
    if not isinstance(record, dict):
        raise SambayError(f"{where}: each line must be a JSON object with a 'text' field, "
                          f"got {type(record).__name__}")
    if "text" not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise SambayError(f"{where}: no 'text' field (fields: {keys})")
    text = record["text"]
    if not isinstance(text, str):
        raise SambayError(f"{where}: the 'text' field must be a string, got {type(text).__name__}")
    return record


def _read_documents(source: Source, hasher: Any = None) -> Iterator[tuple[str, int]]:
    """(document text, bytes of the file it used up) for every document of `source`; the bytes
    read are fed to `hasher` as they go, so hashing costs no second read."""
    path = source.path
    if source.kind in ("text", "shakespeare-md"):
        data = path.read_bytes()
        if hasher is not None:
            hasher.update(data)
        text = _decode(data, str(path))
        if source.kind == "shakespeare-md":
            text = clean_play_markdown(text)
        yield text, len(data)
    elif source.kind == "jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if hasher is not None:
                    hasher.update(line)
                if not line.strip():
                    yield "", len(line)
                    continue
                yield _jsonl_record(line, f"{path}:{lineno}")["text"], len(line)
    elif source.kind == "kjv-jsonl":
        yield from _read_kjv(path, hasher)
    else:
        raise SambayError(f"{path}: unknown source kind {source.kind!r}")


def _read_kjv(path: Path, hasher: Any) -> Iterator[tuple[str, int]]:
    """The King James Bible, one JSON line per verse -> one document per book."""
    book: str | None = None
    chapter: Any = None
    lines: list[str] = []
    used = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if hasher is not None:
                hasher.update(line)
            if not line.strip():
                used += len(line)
                continue
            record = _jsonl_record(line, f"{path}:{lineno}")
            text = record["text"]
            this_book, this_chapter = record.get("book"), record.get("chapter")
            if this_book != book:
                if lines:
                    yield "\n".join(lines).strip() + "\n", used
                lines, used, chapter = [str(this_book)], 0, None
                book = this_book
            if this_chapter != chapter:
                lines.extend(["", f"Chapter {this_chapter}", ""])
                chapter = this_chapter
            lines.append(text.strip())
            used += len(line)
    if lines:
        yield "\n".join(lines).strip() + "\n", used


def iter_texts(inputs: Iterable[str | os.PathLike | Source]) -> Iterator[str]:
    """The non-empty documents of the inputs, as `prepare()` sees them (e.g. to train a tokenizer)."""
    for source in resolve_sources(inputs):
        for text, _ in _read_documents(source):
            if text:
                yield text


def _pieces(text: str) -> Iterator[str]:
    """A long document cut at line ends into pieces of about _ENCODE_PIECE_CHARS characters."""
    start = 0
    while len(text) - start > _ENCODE_PIECE_CHARS:
        cut = text.rfind("\n", start + _ENCODE_PIECE_CHARS // 2, start + _ENCODE_PIECE_CHARS)
        cut = start + _ENCODE_PIECE_CHARS if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    yield text[start:]


# ==== prepare =======================================================================================


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise SambayError(f"the tokenizer's vocab_size must be positive, got {vocab_size}")
    if vocab_size >= 2**32:
        raise SambayError(f"vocab_size {vocab_size} does not fit in 32-bit token ids")
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (int, np.integer)):
        return int(eos)
    ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    if ids:
        return int(ids[-1])  # sambay's Tokenizer lists <|end|> first and the end-of-text token last
    raise SambayError("the tokenizer has no end-of-text token to put between documents; "
                      "use a tokenizer with an eos token or prepare with append_eos=False")


def _tokenizer_fingerprint(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    try:
        return hashlib.sha256(to_str().encode("utf-8")).hexdigest()
    except Exception:  # noqa: BLE001 - a fingerprint is a nicety, never a reason to fail
        return None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SambayError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise SambayError(f"output folder {out_dir} exists and is not empty; choose another --out "
                              "or pass --overwrite (overwrite=True) to replace it")
        if not (out_dir / MANIFEST_NAME).is_file():
            raise SambayError(f"output folder {out_dir} is not empty and is not a prepared token folder "
                              f"(no {MANIFEST_NAME}); refusing to delete it, choose another --out")


def _val_ranges(total: int, val_fraction: float) -> list[tuple[int, int]]:
    """Where the validation chunks lie in the token stream: about val_fraction of it, in chunks of
    about VAL_CHUNK_TOKENS spread evenly (so validation is not all from the last document)."""
    if val_fraction <= 0:
        return []
    n_val = max(1, round(total * val_fraction))
    if n_val >= total:
        raise SambayError(f"the corpus has only {total} tokens: too few to set {val_fraction:g} of it "
                          "aside for validation and still train; add text or lower the val fraction")
    n_chunks = max(1, min(MAX_VAL_CHUNKS, n_val // VAL_CHUNK_TOKENS))
    sizes = [n_val // n_chunks + (1 if j < n_val % n_chunks else 0) for j in range(n_chunks)]
    segment = total / n_chunks
    ranges: list[tuple[int, int]] = []
    prev_end = 0
    for j, size in enumerate(sizes):
        start = int((j + 0.5) * segment - size / 2)
        start = min(max(start, prev_end), total - sum(sizes[j:]))
        ranges.append((start, start + size))
        prev_end = start + size
    return ranges


def _complement(ranges: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for start, end in ranges:
        if start > pos:
            out.append((pos, start))
        pos = end
    if pos < total:
        out.append((pos, total))
    return out


def _write_split(stream: np.ndarray, ranges: list[tuple[int, int]], folder: Path, split: str,
                 shard_tokens: int) -> list[dict[str, Any]]:
    """Copy the token ranges of `stream` into shards `{split}_000000.npy`, ... of at most
    shard_tokens tokens each."""
    total = sum(end - start for start, end in ranges)
    shards: list[dict[str, Any]] = []
    ranges = list(ranges)
    index = 0
    while total > 0:
        count = min(shard_tokens, total)
        name = f"{split}_{index:06d}.npy"
        shard = np.lib.format.open_memmap(folder / name, mode="w+", dtype=stream.dtype, shape=(count,))
        filled = 0
        while filled < count:
            start, end = ranges[0]
            take = min(end - start, count - filled, _COPY_TOKENS)
            shard[filled:filled + take] = stream[start:start + take]
            filled += take
            if start + take == end:
                ranges.pop(0)
            else:
                ranges[0] = (start + take, end)
        shard.flush()
        del shard
        shards.append({"file": name, "num_tokens": count})
        total -= count
        index += 1
    return shards


def _remove_created(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            break


def prepare(
    inputs: Iterable[str | os.PathLike | Source],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    append_eos: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer_info: dict[str, Any] | None = None,
    save_tokenizer: bool = False,
    builtin: str | None = None,
) -> dict[str, Any]:
    """Tokenize the inputs into `out_dir` (token shards + manifest.json); returns the manifest.

    `tokenizer` needs `.encode(str) -> list[int]`, `.vocab_size` and, when `append_eos`,
    `.eos_token_id` or `.eos_token_ids`. `tokenizer_info` is recorded in the manifest (where the
    tokenizer came from); `save_tokenizer` also writes `tokenizer.save(out_dir/tokenizer)`.
    `builtin` names the built-in corpus the inputs came from, for the manifest.
    Everything is first written to a temporary folder beside `out_dir` and renamed at the end.
    """
    out_dir = Path(out_dir)
    if not 0 <= val_fraction <= 0.5:
        raise SambayError(f"val_fraction must be between 0 and 0.5, got {val_fraction}")
    if int(shard_tokens) < 1:
        raise SambayError(f"shard_tokens must be at least 1, got {shard_tokens}")
    shard_tokens = int(shard_tokens)
    sources = resolve_sources(inputs)
    _check_out_dir(out_dir, overwrite)
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    eos = _eos_id(tokenizer) if append_eos else None
    if eos is not None and not 0 <= eos < vocab_size:
        raise SambayError(f"the tokenizer's end-of-text id {eos} is outside its vocabulary ({vocab_size})")
    if save_tokenizer and not hasattr(tokenizer, "save"):
        raise SambayError("save_tokenizer needs a tokenizer with a .save(folder) method")

    created: list[Path] = []
    parent = out_dir.absolute().parent
    for d in reversed([parent, *parent.parents]):
        if not d.exists():
            d.mkdir()
            created.append(d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: give the usual permissions
        manifest = _prepare_into(tmp, sources, tokenizer, vocab_size, dtype, eos, val_fraction,
                                 shard_tokens, progress, tokenizer_info, save_tokenizer, builtin)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    return manifest


def _prepare_into(tmp: Path, sources: list[Source], tokenizer: Any, vocab_size: int, dtype: np.dtype,
                  eos: int | None, val_fraction: float, shard_tokens: int, progress: bool,
                  tokenizer_info: dict[str, Any] | None, save_tokenizer: bool,
                  builtin: str | None) -> dict[str, Any]:
    from tqdm import tqdm

    stream_path = tmp / "stream.tmp"
    total = 0
    num_docs = 0
    source_records: list[dict[str, Any]] = []
    buffer: list[int] = []

    def flush(f: Any) -> None:
        nonlocal total
        if not buffer:
            return
        arr = np.asarray(buffer, dtype=np.int64)
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise SambayError(f"the tokenizer produced id {bad}, outside its vocabulary of {vocab_size}; "
                              "its vocab_size is wrong or the tokenizer is damaged")
        f.write(arr.astype(dtype).tobytes())
        total += len(arr)
        buffer.clear()

    encode = _batch_encoder(tokenizer)
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True, unit_divisor=1024,
               desc="tokenizing", disable=not progress, file=sys.stderr)
    try:
        with open(stream_path, "wb") as f:
            for source in sources:
                hasher = hashlib.sha256()
                docs = 0
                tokens_before = total + len(buffer)
                pending: list[list[str]] = []  # documents (as pieces) waiting to be encoded
                pending_chars = pending_bytes = 0

                def encode_pending() -> None:
                    nonlocal pending_chars, pending_bytes
                    pieces = [p for doc in pending for p in doc]
                    encoded = iter(encode(pieces))
                    for doc in pending:
                        for _ in doc:
                            buffer.extend(next(encoded))
                        if eos is not None:
                            buffer.append(eos)
                    pending.clear()
                    if len(buffer) >= _FLUSH_TOKENS:
                        flush(f)
                    bar.update(pending_bytes)
                    pending_chars = pending_bytes = 0

                for text, used in _read_documents(source, hasher):
                    pending_bytes += used
                    if text:
                        pending.append(list(_pieces(text)))
                        pending_chars += len(text)
                        docs += 1
                    if pending_chars >= _ENCODE_BATCH_CHARS or len(pending) >= 4096:
                        encode_pending()
                encode_pending()
                num_docs += docs
                source_records.append({
                    "path": str(source.path.absolute()),
                    "kind": source.kind,
                    "bytes": source.size,
                    "sha256": hasher.hexdigest(),
                    "documents": docs,
                    "tokens": total + len(buffer) - tokens_before,
                })
            flush(f)
    finally:
        bar.close()

    if total == 0:
        raise SambayError("the corpus is empty: the inputs hold no text (0 tokens)")

    stream = np.memmap(stream_path, dtype=dtype, mode="r", shape=(total,))
    val_ranges = _val_ranges(total, val_fraction)
    splits: dict[str, Any] = {}
    for split, ranges in (("train", _complement(val_ranges, total)), ("val", val_ranges)):
        shards = _write_split(stream, ranges, tmp, split, shard_tokens)
        splits[split] = {"num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    del stream
    stream_path.unlink()

    tok_record: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "sha256": _tokenizer_fingerprint(tokenizer),
    }
    tok_record.update(tokenizer_info or {})
    if save_tokenizer:
        tokenizer.save(tmp / TOKENIZER_DIRNAME)
        tok_record["path"] = TOKENIZER_DIRNAME

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "append_eos": eos is not None,
        "num_documents": num_docs,
        "num_tokens": total,
        "val_fraction": val_fraction,
        "val_ranges": [list(r) for r in val_ranges],
        "shard_tokens": shard_tokens,
        "splits": splits,
        "tokenizer": tok_record,
        "sources": source_records,
        "builtin": builtin_info(builtin) if builtin else None,
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _batch_encoder(tokenizer: Any) -> Any:
    """texts -> list of id lists: the tokenizer's own `encode_batch` when it has one, else `.encode`."""
    batch = getattr(tokenizer, "encode_batch", None)
    if callable(batch):
        return lambda texts: [list(ids) for ids in batch(texts)] if texts else []
    return lambda texts: [tokenizer.encode(t) for t in texts]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ==== reading prepared data =========================================================================


class TokenDataset:
    """A prepared token folder, opened lazily (memory maps; nothing is read until asked for).

    Sequences are packed: a split's token stream is cut into windows of seq_len+1 tokens that
    start every seq_len tokens (window i = tokens [i*seq_len, (i+1)*seq_len]), x is a window's
    first seq_len tokens and y the last seq_len. Training visits the windows in a fresh random
    order every epoch.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise SambayError(f"{self.path} is not a prepared token folder (no {MANIFEST_NAME}); "
                              "make one with `sambay prepare`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SambayError(f"{manifest_path} could not be read ({e}); prepare the data again") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SambayError(f"{manifest_path} is not a sambay token manifest; prepare the data again")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise SambayError(f"{manifest_path} has format version {manifest.get('format_version')}, newer "
                              f"than this sambay understands ({FORMAT_VERSION}); upgrade sambay")
        self.manifest: dict[str, Any] = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_token_id = manifest.get("eos_token_id")
        self._files: dict[str, list[Path]] = {}
        self._offsets: dict[str, np.ndarray] = {}
        for split in SPLITS:
            info = manifest["splits"].get(split, {"shards": []})
            files = [self.path / s["file"] for s in info["shards"]]
            for file in files:
                if not file.is_file():
                    raise SambayError(f"shard {file} is missing; prepare the data again")
            self._files[split] = files
            self._offsets[split] = np.cumsum([0] + [int(s["num_tokens"]) for s in info["shards"]])
        self._shards: dict[tuple[str, int], np.ndarray] = {}
        self._perms: dict[tuple[str, int, int, int], np.ndarray] = {}

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, train={self.num_tokens('train')}, "
                f"val={self.num_tokens('val')}, dtype={self.dtype.name})")

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer saved with the data (`prepare --train-tokenizer`), if any."""
        rel = self.manifest.get("tokenizer", {}).get("path")
        return self.path / rel if rel else None

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise SambayError(f"unknown split {split!r}; use 'train' or 'val'")

    def num_tokens(self, split: str = "train") -> int:
        self._check_split(split)
        return int(self._offsets[split][-1])

    def num_windows(self, split: str, seq_len: int) -> int:
        """How many sequences of seq_len (+1 for the shifted targets) the split holds."""
        self._check_split(split)
        return max(0, (self.num_tokens(split) - 1) // seq_len)

    def _shard(self, split: str, index: int) -> np.ndarray:
        key = (split, index)
        if key not in self._shards:
            file = self._files[split][index]
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SambayError(f"shard {file} could not be read ({e}); prepare the data again") from e
            expected = int(self._offsets[split][index + 1] - self._offsets[split][index])
            if arr.ndim != 1 or arr.shape[0] != expected or arr.dtype != self.dtype:
                raise SambayError(f"shard {file} is damaged (holds {arr.shape} {arr.dtype}, the manifest "
                                  f"says {expected} {self.dtype}); prepare the data again")
            self._shards[key] = arr
        return self._shards[key]

    def tokens(self, split: str, start: int, end: int) -> np.ndarray:
        """A copy of tokens [start, end) of a split (across shard boundaries), as int64."""
        self._check_split(split)
        n = self.num_tokens(split)
        if not 0 <= start <= end <= n:
            raise SambayError(f"token range [{start}, {end}) is outside the {split} split ({n} tokens)")
        offsets = self._offsets[split]
        out = np.empty(end - start, dtype=np.int64)
        pos = start
        index = int(np.searchsorted(offsets, start, side="right")) - 1
        while pos < end:
            shard = self._shard(split, index)
            lo = pos - int(offsets[index])
            take = min(end - pos, shard.shape[0] - lo)
            out[pos - start:pos - start + take] = shard[lo:lo + take]
            pos += take
            index += 1
        return out

    def _windows(self, split: str, windows: Sequence[int] | np.ndarray, seq_len: int):
        import torch

        rows = np.stack([self.tokens(split, int(w) * seq_len, int(w) * seq_len + seq_len + 1)
                         for w in windows])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _need_windows(self, split: str, seq_len: int) -> int:
        if int(seq_len) < 1:
            raise SambayError(f"sequence length must be at least 1, got {seq_len}")
        n = self.num_tokens(split)
        if split == "val" and n == 0:
            raise SambayError(f"{self.path} has no validation tokens; prepare it with a val fraction > 0")
        count = self.num_windows(split, seq_len)
        if count == 0:
            raise SambayError(f"sequence length {seq_len} is longer than the data: the {split} split of "
                              f"{self.path} has {n} tokens and a sequence needs {seq_len + 1}; use a "
                              "shorter --seq-len or more text")
        return count

    def _epoch_permutation(self, split: str, count: int, seed: int, epoch: int) -> np.ndarray:
        key = (split, count, seed, epoch)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
            perm = rng.permutation(count)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    @staticmethod
    def _check_layout(batch_size: int, rank: int, world_size: int) -> None:
        if int(batch_size) < 1:
            raise SambayError(f"batch size must be at least 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise SambayError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")

    def batch_at(self, step: int, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train"):
        """(x, y) of one training step for one rank: int64 tensors of shape [batch_size, seq_len].

        The global batch of step s is rows [s*G, (s+1)*G) of an endless sequence of windows that
        visits every window once per epoch in an order drawn from (seed, epoch); G =
        batch_size * world_size and rank r takes rows [r*batch_size, (r+1)*batch_size) of it.
        """
        self._check_split(split)
        self._check_layout(batch_size, rank, world_size)
        if int(step) < 0 or int(seed) < 0:
            raise SambayError(f"step and seed must not be negative (step {step}, seed {seed})")
        count = self._need_windows(split, seq_len)
        first = int(step) * batch_size * world_size + rank * batch_size
        windows = []
        for q in range(first, first + batch_size):
            epoch, pos = divmod(q, count)
            windows.append(self._epoch_permutation(split, count, int(seed), epoch)[pos])
        return self._windows(split, windows, seq_len)

    def batches(self, split: str = "train", seq_len: int = 256, batch_size: int = 8, *, rank: int = 0,
                world_size: int = 1, start_step: int = 0, seed: int = 0):
        """Endless (x, y) batches for steps start_step, start_step+1, ... (see `batch_at`).

        Arguments are checked here, before the first batch is asked for. Within an epoch no two
        ranks get the same window at a step; only when a global batch is larger than the whole
        split can a window come twice (from two epochs).
        """
        self._check_split(split)
        self._check_layout(batch_size, rank, world_size)
        if int(start_step) < 0 or int(seed) < 0:
            raise SambayError(f"start_step and seed must not be negative ({start_step}, {seed})")
        self._need_windows(split, seq_len)

        def gen():
            step = int(start_step)
            while True:
                yield self.batch_at(step, seq_len, batch_size, rank=rank, world_size=world_size,
                                    seed=seed, split=split)
                step += 1

        return gen()

    def val_batches(self, seq_len: int, batch_size: int, max_batches: int | None = None, *,
                    rank: int = 0, world_size: int = 1):
        """The fixed validation set: windows in order, rank r taking every world_size-th one.

        Every rank gets the same number of windows (up to world_size-1 trailing windows are left
        out); the last batch may be smaller than batch_size. `max_batches` caps the batches per rank.
        """
        self._check_layout(batch_size, rank, world_size)
        count = self._need_windows("val", seq_len)
        if count < world_size:
            raise SambayError(f"the validation split has only {count} sequences of length {seq_len}, "
                              f"fewer than the {world_size} ranks; use a larger val fraction")
        mine = np.arange(rank, count - count % world_size, world_size)
        n_batches = math.ceil(len(mine) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max(0, int(max_batches)))

        def gen():
            for b in range(n_batches):
                yield self._windows("val", mine[b * batch_size:(b + 1) * batch_size], seq_len)

        return gen()


# ==== command line ==================================================================================


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize text files into training shards",
        description="Tokenize text (.txt/.md: one document per file; .jsonl: a 'text' field per line; "
                    "folders: their .txt/.md/.jsonl files) into token shards for `sambay train`. "
                    f"Built-in corpora ({', '.join(BUILTIN_CORPORA)}) need: pip install "
                    + " ".join(f"'{p.requirement}'" for p in PACKAGES.values()),
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files, .jsonl files or folders")
    p.add_argument("--builtin", choices=list(BUILTIN_CORPORA), metavar="NAME",
                   help=f"use a built-in public-domain corpus: {', '.join(BUILTIN_CORPORA)} "
                        f"({DEFAULT_BUILTIN} = Shakespeare's plays + the King James Bible)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH", default=None,
                     help="tokenizer folder (a checkpoint) or 'phi4' (the default)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE", default=None,
                     help="train a byte-level BPE of this size on the inputs and save it in OUT/tokenizer")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"share of tokens kept for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-eos", action="store_true", help="do not put an end-of-text token after each document")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.inputs and not args.builtin:
        raise SambayError("give input files or folders, or --builtin NAME (e.g. --builtin classics)")
    inputs: list[Any] = []
    if args.builtin:
        inputs.extend(builtin_corpus(args.builtin))
    inputs.extend(args.inputs)
    # Check everything that can be checked before the (possibly long) tokenizer training.
    sources = resolve_sources(inputs)
    out_dir = Path(args.out)
    _check_out_dir(out_dir, args.overwrite)
    if not 0 <= args.val_fraction <= 0.5:
        raise SambayError(f"--val-fraction must be between 0 and 0.5, got {args.val_fraction}")

    if args.train_tokenizer is not None:
        from sambay.tokenizer import train_bpe_tokenizer

        if not args.quiet:
            print(f"training a byte-level BPE tokenizer of {args.train_tokenizer} tokens ...", file=sys.stderr)
        tokenizer = train_bpe_tokenizer(iter_texts(sources), args.train_tokenizer)
        info: dict[str, Any] = {"source": "trained", "trained_vocab_size": args.train_tokenizer}
        save = True
    else:
        from sambay.tokenizer import load_tokenizer

        spec = args.tokenizer or "phi4"
        tokenizer = load_tokenizer(spec)
        info = {"source": "phi4" if spec == "phi4" else str(Path(spec).absolute())}
        save = False

    manifest = prepare(sources, tokenizer, out_dir, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, append_eos=not args.no_eos,
                       overwrite=args.overwrite, progress=not args.quiet, tokenizer_info=info,
                       save_tokenizer=save, builtin=args.builtin)
    splits = manifest["splits"]
    n_shards = sum(len(s["shards"]) for s in splits.values())
    print(f"wrote {manifest['num_tokens']:,} tokens from {manifest['num_documents']:,} documents "
          f"(train {splits['train']['num_tokens']:,}, val {splits['val']['num_tokens']:,}; "
          f"{manifest['dtype']}, vocab {manifest['vocab_size']:,}) in {n_shards} shard(s) to {out_dir}")
    return 0
