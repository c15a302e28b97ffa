"""Atomic file writes: every file probe writes appears whole under its name, or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it to `path`.

    A crash or an exception midway leaves `path` as it was and removes the temporary file. The
    temporary name carries the process id, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish(tmp: Path, path: Path) -> None:
    """fsync a finished temporary file and rename it into place."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
