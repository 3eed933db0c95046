"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Hand-written on purpose (ten lines): the usual recipe, a unique sibling temporary file, flushed and
fsynced, then `os.replace`; `atomicwrites`, the package that did this, is archived.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` through `write(file)`; on any error the previous file is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` for a text file (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode()))
