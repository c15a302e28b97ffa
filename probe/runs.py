"""Run folders: what `probe fit` and `probe finetune` leave (metrics.json, and a fit's head.json + head.npz), each
with the identity of what made it (probe.identity) inside, so a later command reuses a run only when
that identity is the one it wants.

A fit's folder also keeps its per-test-image predictions (predictions.h5), so any later statistic (an
interval, a paired comparison, calibration) is computed from them without fitting again.

A run folder's name is readable (the cache's name, the head, a few options) and ends in the digest of
its identity, so two runs that differ in any option never share a folder; but the name is never what
decides a reuse: `finished` compares the identity stored in metrics.json with the one wanted.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probe import identity
from probe.errors import ProbeError
from probe.files import atomic_write, check_space, lock, make_dir

HEAD_FORMAT = 2  # 1: the same artifact, pickled in head.joblib (probe 0.4 and older)


@dataclass
class FitResult:
    """What `probe fit` and `probe finetune` return: the run folder and its metrics."""
    out: Path  # the run folder: metrics.json (and a fit's head.json, head.npz and predictions.h5)
    metrics: dict
    reused: bool = False  # True: a finished run of the same identity was read back, nothing was fitted


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
    if not needs_head:
        return metrics
    try:  # a run is reused only whole: its head loads and its predictions read
        load_head(out_dir)
        load_predictions(out_dir)
    except ProbeError:
        return None
    return metrics


TOP_K = 5  # classes kept per test image in predictions.h5


def predictions_bytes(rows: np.ndarray, true: np.ndarray, probabilities: np.ndarray, source: str,
                      classes: list[str]) -> bytes:
    """predictions.h5: one row per test image, in the test split's order, columnar (plain h5py reads it):
    `row` (the image's row in the cache's `source` split), `true` and `predicted` (class indices), `top_k`
    and `top_k_probability` (the most probable classes), `p_true` (the true class's probability)."""
    import h5py

    from probe.heads import rank_classes

    ranked = rank_classes(probabilities)[:, :TOP_K]
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f["row"], f["true"], f["predicted"] = np.asarray(rows, np.int64), np.asarray(true, np.int64), ranked[:, 0]
        f["top_k"] = ranked.astype(np.int32)
        f["top_k_probability"] = np.take_along_axis(probabilities, ranked, 1).astype(np.float32)
        f["p_true"] = probabilities[np.arange(len(true)), true].astype(np.float32)
        f.attrs.update(source=source, classes=json.dumps(classes))
    return buffer.getvalue()


def load_predictions(run: str | os.PathLike) -> dict:
    """A run's predictions.h5 as arrays (and its source split and classes)."""
    import h5py

    path = Path(run) / "predictions.h5" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ProbeError(f"no predictions.h5 in {path.parent}: runs of probe 0.3 and older keep none; run the fit or fine-tune again")
    try:
        with h5py.File(path, "r") as f:
            out = {name: f[name][...] for name in ("row", "true", "predicted", "top_k", "top_k_probability", "p_true")}
            out.update(source=f.attrs["source"], classes=json.loads(f.attrs["classes"]))
    except (OSError, KeyError, ValueError) as e:
        raise ProbeError(f"{path} is damaged ({type(e).__name__}); fit again") from None
    return out


def save_run(out_dir: Path, artifact: dict | None, metrics: dict, predictions: dict | None = None) -> None:
    """Write head.npz and head.json (probe.headfile: no pickle), predictions.h5 and metrics.json, each
    atomically, under a lock so two writers cannot interleave (metrics.json last: a run with metrics is
    whole). A head.joblib of an earlier probe in the folder is removed: the folder holds one head."""
    from probe import headfile

    make_dir(out_dir)
    head = headfile.dumps(artifact) if artifact is not None else None  # first, so the disk check knows its size
    text = json.dumps(metrics, indent=2, allow_nan=False).encode()
    table = predictions_bytes(**predictions) if predictions is not None else None
    sizes = len(text) + (len(head[0]) + len(head[1]) if head else 0) + (len(table) if table is not None else 0)
    with lock(out_dir / ".lock"):
        check_space(out_dir, sizes, "head.json, head.npz, predictions.h5 and metrics.json")
        if head is not None:
            atomic_write(out_dir / "head.npz", head[1])
            atomic_write(out_dir / "head.json", head[0])
            (out_dir / "head.joblib").unlink(missing_ok=True)
        else:  # a fine-tune: another run's head left in the folder is not this run's
            for name in ("head.json", "head.npz", "head.joblib"):
                (out_dir / name).unlink(missing_ok=True)
        if table is not None:
            atomic_write(out_dir / "predictions.h5", table)
        atomic_write(out_dir / "metrics.json", text)


def load_head(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Load a head saved by `probe fit`: a run folder (or its head.json). A head.joblib of probe 0.4 and
    older is a pickle, which can run any code when opened: it is loaded only with trust_pickle."""
    from probe import headfile

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    pickled = folder / "head.joblib" if path.is_dir() or path.name == "head.json" else path
    if (folder / "head.json").is_file() and (path.is_dir() or path.name == "head.json"):
        artifact = headfile.load(folder)
    elif pickled.name.endswith(".joblib") and pickled.is_file():
        if not trust_pickle:
            raise ProbeError(f"{pickled} is a pickle (a head of probe 0.4 or older), which runs whatever code it holds "
                             "when opened: run probe fit again, or if you made it yourself, give --trust-pickle "
                             "(probe predict and probe export take it)")
        import joblib

        try:
            artifact = joblib.load(pickled)
        except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
            raise ProbeError(f"cannot load head {pickled} ({type(e).__name__}); it is damaged: run probe fit again") from None
        if isinstance(artifact, dict) and artifact.get("format") == 1:
            artifact["format"] = HEAD_FORMAT  # the same artifact, pickled
    else:
        raise ProbeError(f"no head in {path}; give the run folder (or its head.json) that probe fit wrote")
    needed = ("pipeline", "classes", "model", "weights", "weights_identity", "resolution", "feature_dim")
    if not isinstance(artifact, dict) or artifact.get("format") != HEAD_FORMAT or any(k not in artifact for k in needed):
        raise ProbeError(f"{path} is not a probe head of format {HEAD_FORMAT}; run probe fit again")
    seen = getattr(artifact["pipeline"], "classes_", None)
    if not isinstance(artifact["classes"], list) or seen is None or len(seen) == 0 or \
            int(np.max(seen)) >= len(artifact["classes"]):
        raise ProbeError(f"the head in {path} names fewer classes than its pipeline predicts: it is damaged; run probe "
                         "fit again")
    return artifact
