"""Run folders: what `probe fit` and `probe finetune` leave (metrics.json, and a fit's head.joblib), each
with the identity of what made it (probe.identity) inside, so a later command reuses a run only when
that identity is the one it wants.

A run folder's name is readable (the cache's name, the head, a few options) and ends in the digest of
its identity, so two runs that differ in any option never share a folder; but the name is never what
decides a reuse: `finished` compares the identity stored in metrics.json with the one wanted.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from probe import identity
from probe.errors import ProbeError
from probe.files import atomic_write, check_space, lock, make_dir

HEAD_FORMAT = 1


def folder_name(readable: str, spec: dict) -> str:
    """`readable` plus the digest of the identity: unique per identity, readable by people."""
    return f"{readable}__{identity.digest(spec, 8)}"


def finished(out_dir: str | os.PathLike, spec: dict, needs_head: bool = True) -> dict | None:
    """The metrics of a run already in `out_dir` whose stored identity is `spec` in every field, or None."""
    out_dir = Path(out_dir)
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not identity.same(metrics.get("identity"), spec):
        return None
    return metrics if not needs_head or (out_dir / "head.joblib").exists() else None


def save_run(out_dir: Path, artifact: dict | None, metrics: dict) -> None:
    """Write head.joblib and metrics.json, each atomically, under a lock so two writers cannot interleave."""
    import joblib

    make_dir(out_dir)
    head = None
    if artifact is not None:  # serialized first, so the disk check knows its size
        buffer = io.BytesIO()
        joblib.dump(artifact, buffer)
        head = buffer.getbuffer()
    text = json.dumps(metrics, indent=2, allow_nan=False).encode()
    with lock(out_dir / ".lock"):
        check_space(out_dir, len(text) + (len(head) if head is not None else 0), "head.joblib and metrics.json")
        if head is not None:
            atomic_write(out_dir / "head.joblib", head)
        atomic_write(out_dir / "metrics.json", text)


def load_head(path: str | os.PathLike) -> dict:
    """Load a head saved by `probe fit` (a pickle: load only heads from sources you trust)."""
    import joblib

    path = Path(path)
    if path.is_dir():
        path = path / "head.joblib"
    if not path.is_file():
        raise ProbeError(f"no head file {path}; give the head.joblib (or run folder) that probe fit wrote")
    try:
        artifact = joblib.load(path)
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise ProbeError(f"cannot load head {path} ({type(e).__name__}); it is damaged: run probe fit again") from None
    needed = ("pipeline", "classes", "model", "weights", "weights_identity", "resolution", "feature_dim")
    if not isinstance(artifact, dict) or artifact.get("format") != HEAD_FORMAT or any(k not in artifact for k in needed):
        raise ProbeError(f"{path} is not a probe head of format {HEAD_FORMAT}; run probe fit again")
    return artifact
