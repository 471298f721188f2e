"""Writing files so that a crash never leaves a half-written one: write a temp file, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sambay.errors import SambayError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    return _umask()


def read_json(path: str | os.PathLike, default=None):
    """The parsed JSON file at `path`, or `default` when there is no such file. A file that is not
    valid JSON raises SambayError naming it (a corrupt or hand-edited checkpoint file)."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SambayError(f"{path} is not valid JSON ({e}); it is damaged: restore it from the "
                          f"original checkpoint or download it again") from None


def is_hub_id(text: str) -> bool:
    """Whether what a user typed looks like a Hugging Face repo id (`owner/name`) rather than a path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))
