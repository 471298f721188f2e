"""`prepare`: text files -> a folder of token shards, written so that a crash leaves nothing behind.

`prepare(inputs, tokenizer, out_dir)` reads the inputs (`sambay.train.sources`), tokenizes them,
puts an end-of-text token after every document and writes the token stream as shards plus
`manifest.json` (`sambay.train.manifest`). A small, evenly spread part of the stream is set aside
as the validation split. Everything is written into a temporary folder next to `out_dir` and
renamed at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sambay.errors import SambayError
from sambay.files import umask
from sambay.train.corpus import builtin_info
from sambay.train.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, TOKENIZER_DIRNAME, token_dtype
from sambay.train.sources import Source, read_documents, resolve_sources

DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB per uint16 shard
DEFAULT_VAL_FRACTION = 0.005
VAL_CHUNK_TOKENS = 1024  # the validation split is taken as chunks of about this many tokens ...
MAX_VAL_CHUNKS = 64  # ... spread evenly over the corpus, at most this many
_ENCODE_PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about 1 Mi characters
_ENCODE_BATCH_CHARS = 1 << 22  # documents are encoded in batches of about 4 Mi characters
_FLUSH_TOKENS = 1 << 20
_COPY_TOKENS = 1 << 23


def _pieces(text: str) -> Iterator[str]:
    """A long document cut at line ends into pieces of about _ENCODE_PIECE_CHARS characters."""
    start = 0
    while len(text) - start > _ENCODE_PIECE_CHARS:
        cut = text.rfind("\n", start + _ENCODE_PIECE_CHARS // 2, start + _ENCODE_PIECE_CHARS)
        cut = start + _ENCODE_PIECE_CHARS if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    yield text[start:]


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


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """`out_dir` must be absent, empty or, with `overwrite`, a prepared token folder (never a folder
    of other files, which replacing it would delete)."""
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
    check_out_dir(out_dir, overwrite)
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
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: give the usual permissions
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

                for text, used in read_documents(source, hasher):
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

