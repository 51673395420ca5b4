"""Atomic file writes: write a temporary sibling, then rename it over the target.

A reader (or a process killed mid-write) never sees half a file: the target is either the old file or
the whole new one. Every file the library and the runner write goes through here. Each writer gets its own
temporary name (``<name>.<pid>.<random>.tmp``, in the same folder so that the rename stays on one file
system), so processes writing the same file at once (parallel sweep jobs filling the token cache) never
remove or replace each other's half-written file: the last rename wins, and every rename is a whole file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "temporary_name", "write_text", "write_json"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit rename it over ``path`` (a file or a
    folder), on an error remove it and leave ``path`` as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        _remove(path)
    os.replace(tmp, path)


def temporary_name(path: Path) -> Path:
    """A sibling of ``path`` that no other writer uses: ``<name>.<pid>.<8 hex digits>.tmp``."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj, **dump_kwargs) -> Path:
    """JSON with a trailing newline; ``default=str`` unless given (paths, numpy scalars)."""
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("default", lambda o: o.item() if hasattr(o, "item") else str(o))
    return write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
