"""Atomic file and directory writes (a reader never sees a half-written output), and JSON reads
that fail with one clear error."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmgym.errors import GlmgymError

__all__ = ["atomic_dir", "atomic_path", "atomic_write_json", "atomic_write_text", "fix_mode", "read_json"]


def fix_mode(path: str | Path, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp path (0600/0700) the permissions a plain open() would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp file path beside `path` to write to; it replaces `path` only if the block
    finishes without error (otherwise it is removed).

    Args:
        path: the final file.
        suffix: the temp file's suffix (writers that pick a format by extension need the real one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fix_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`.

    Raises:
        GlmgymError: the file is missing, unreadable, not JSON, or not a JSON object; the message
            names the file.
    """

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlmgymError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GlmgymError(f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise GlmgymError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    fix_mode(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        # Two renames: the old directory stays whole until the new one is in place.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
