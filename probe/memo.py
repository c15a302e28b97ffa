"""What probe learns by reading every file of a data set (its content fingerprint, the index of its
tar shards), kept so that the next command over the same unchanged files does not read them again.

A result is filed under the files' stat signature: path, size, inode, and the modification and status
change times in nanoseconds. Writing to a file changes its status change time (ctime), and no user
call can set that back, so a file whose content changed never matches an old signature; a file
replaced, moved or copied elsewhere has another inode or path. A result is not kept while any of its
files changed in the last few seconds: a rewrite within the file system's clock tick would keep the
same times (git's "racy clean" case), and a data set being written is not worth remembering yet.

The folder is $PROBE_MEMO_DIR, else $XDG_CACHE_HOME/probe/memo, else ~/.cache/probe/memo; anything
in it can be deleted at any time. A memo that cannot be read or written is ignored: the files are
read as if it were not there.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from probe.errors import ProbeError

SETTLED_SECONDS = 5.0  # a file changed more recently than this is not remembered


def folder() -> Path:
    if os.environ.get("PROBE_MEMO_DIR"):
        return Path(os.environ["PROBE_MEMO_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "probe" / "memo"


def signature(kind: str, named_files: list[tuple[str, str | os.PathLike]]) -> tuple[str, bool]:
    """The stat signature of (name, path) pairs for results of `kind`, and whether every file has settled."""
    digest = hashlib.sha256(kind.encode() + b"\0")
    newest = 0
    for name, path in named_files:
        try:
            st = os.stat(path)
        except OSError as e:
            raise ProbeError(f"cannot read {path}: {e.strerror or e}") from None
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        digest.update(f"{name}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0"
                      f"{st.st_ctime_ns}\n".encode())
    return digest.hexdigest(), newest < (time.time() - SETTLED_SECONDS) * 1e9


def get(key: str) -> bytes | None:
    try:
        return (folder() / key).read_bytes()
    except OSError:
        return None


def put(key: str, data: bytes) -> None:
    """Keep `data` under `key`, whole or not at all; a folder that cannot be written is no error."""
    path = folder() / key
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
