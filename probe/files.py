"""Writing files safely: every file probe writes appears whole under its name, or not at all, and a
full or read-only disk is a one-line error, never a traceback or a crash in a library."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from filelock import FileLock, Timeout

from probe.device import format_bytes
from probe.errors import ProbeError

# Kept free beyond the bytes about to be written: file system metadata, and room for other writers.
DISK_MARGIN = 1 << 16


def check_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, before writing, when `folder`'s disk has less than `needed` bytes (plus a margin) free."""
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise ProbeError(f"not enough disk space for {what} in {folder}: needs {format_bytes(needed + DISK_MARGIN)}, "
                         f"{format_bytes(free)} free; free some space and run the same command again")


def make_dir(path: str | os.PathLike) -> Path:
    """mkdir -p, with a read-only or missing parent as a one-line error."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProbeError(f"cannot create folder {path}: {e.strerror or e}") from None
    return path


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object], size: int = 0) -> Path:
    """Write `data` (bytes, or a function writing to a file) to a temporary file beside `path`, fsync it,
    then rename it to `path`.

    The free space is checked first against the bytes, or `size` for a function. A crash or an error
    midway leaves `path` as it was and removes the temporary file; the temporary file of a writer
    killed midway is removed by the next write of `path`. The temporary name carries the
    process id, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove_stale_temporaries(path)  # what a writer killed midway left: its space counts in the check below
    check_space(path.parent, len(data) if isinstance(data, (bytes, memoryview)) else size, path.name)
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
        publish(tmp, path)
    except OSError as e:  # a disk filled by someone else meanwhile, a read-only folder, a quota
        raise ProbeError(f"cannot write {path}: {e.strerror or e}; {format_bytes(shutil.disk_usage(path.parent).free)} "
                         "free there") from None
    finally:
        _remove(tmp)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of earlier writers of `path` that are no longer running (killed midway):
    `.NAME.PID.tmp` with no process PID on this machine."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(tmp)
        except OSError:  # running, under another user
            pass


def _remove(path: Path) -> None:
    """Remove a temporary file if it is there; on a read-only disk it never was."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class _Lock(FileLock):
    """A FileLock whose creation on a read-only or full disk is a one-line error."""

    def acquire(self, *args, **kwargs):
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:  # another process holds it: the caller decides (Timeout is an OSError too)
            raise
        except OSError as e:
            raise ProbeError(f"cannot write in {Path(self.lock_file).parent}: {e.strerror or e}") from None


def lock(path: str | os.PathLike) -> FileLock:
    """A FileLock on `path`, whose creation on a read-only or full disk is a one-line error."""
    return _Lock(str(path))


def publish(tmp: Path, path: Path) -> None:
    """fsync a finished temporary file and rename it into place."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_png(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG, rendered in memory, then written atomically (a full disk is a one-line
    error, not half a PNG); the figure is closed."""
    import io
    import warnings

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a figure too small for its labels is drawn as it is, not refused
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())
