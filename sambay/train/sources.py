"""Reading the text a training corpus is made of: which files, of which kind, and their documents.

* `resolve_sources(inputs)` checks the inputs and says how to read each file: plain text (.txt,
  .md: one document per file), JSON lines (.jsonl: one document per line, in its "text" field),
  or a file of a built-in corpus (`sambay.train.corpus`), recognised by where it lies.
* `read_documents(source)` yields a source's documents, cleaning the built-in corpora as it goes
  (the plays from markdown, the Bible's verse lines joined into books).
* `iter_texts(inputs)` / `builtin_texts(name)` give the documents as `prepare()` sees them, e.g. to
  train a tokenizer on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sambay.errors import SambayError
from sambay.train.corpus import (DEFAULT_BUILTIN, CorpusPackage, builtin_corpus, builtin_kind, builtin_targets,
                                 clean_play_markdown)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ""}
JSONL_SUFFIXES = {".jsonl"}


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


def read_documents(source: Source, hasher: Any = None) -> Iterator[tuple[str, int]]:
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
        for text, _ in read_documents(source):
            if text:
                yield text


def builtin_texts(name: str = DEFAULT_BUILTIN) -> Iterator[str]:
    """The cleaned documents of a built-in corpus (one play, one book of the Bible, ...)."""
    return iter_texts(builtin_corpus(name))
