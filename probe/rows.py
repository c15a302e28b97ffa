"""Feature rows read a chunk at a time: what a fit reads when the features may not fit in the memory it
is given (`probe fit --max-memory`), and what each rank of a torchrun fit holds (its share of the rows).

A Rows is a list of parts, each some rows of one feature matrix of a cache file (its features, the
columns of a layer group, or one augmented view), with their labels and the image each row shows.
`chunks()` yields this rank's share of the rows in file order, as float32 (a float16 cache is up-cast
per chunk); what fits of the budget stays in memory after the first pass, the rest is read again
from the file each pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from probe import distributed
from probe.errors import ProbeError


@dataclass
class Part:
    columns: list[str]  # HDF5 datasets side by side (one, or the layers of a group such as last4)
    view: int | None  # an index into the first axis of train/views, else None
    rows: np.ndarray  # sorted rows of those datasets
    labels: np.ndarray  # the label of each row
    images: np.ndarray  # the image each row shows (views repeat the training images)


class Rows:
    """The rows of `parts` of a cache file, read within `budget` bytes (None: no limit); keep=False for
    rows read once (a test split), of which nothing is kept between passes."""

    def __init__(self, path: str | Path, parts: list[Part], budget: int | None = None, chunk_rows: int | None = None,
                 keep: bool = True, key_hash: str | None = None):
        # The absolute path and the cache's identity: a head that streams its rows (kNN) reads them from
        # the same file wherever it is used from, and refuses another file at that path.
        self.path, self.parts, self.key_hash = Path(path).absolute(), parts, key_hash
        self._checked = False
        with h5py.File(self.path, "r") as f:
            self.dim = sum(f[c].shape[-1] for c in parts[0].columns)
        self.labels = np.concatenate([p.labels for p in parts])
        self.images = np.concatenate([p.images for p in parts])
        # Half the budget for chunks kept between passes; a chunk is 1/64 of it as float32, since working
        # on one takes about ten chunks' worth (the up-cast, the rows kept, the scaled copy, the logits).
        budget = budget or (1 << 62)
        self.chunk_rows = chunk_rows or int(max(256, min(1 << 16, budget // (64 * 4 * max(1, self.dim)))))
        self.resident_budget = budget // 2 if keep else 0
        self._kept: dict[tuple[int, int, int], np.ndarray] = {}
        self._kept_bytes = 0

    def __len__(self) -> int:
        return len(self.labels)

    def nbytes(self) -> int:
        """The bytes all rows take as float32."""
        return len(self) * self.dim * 4

    def __getstate__(self) -> dict:  # a head that streams its training rows pickles the reference, not them
        return {**self.__dict__, "_kept": {}, "_kept_bytes": 0, "_checked": False}

    def _check(self, f: h5py.File) -> None:
        """Once per process: the file at self.path is still the cache these rows were planned on."""
        if self.key_hash is not None and not self._checked:
            found = f.attrs.get("key_hash")
            if found != self.key_hash:
                raise ProbeError(f"the cache at {self.path} is not the one these rows are of (its key hash is {found}, "
                                 f"they were planned on {self.key_hash}): it was replaced; fit again on the new one")
        self._checked = True

    def chunks(self, keep: np.ndarray | None = None, every_rank: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(X float32 [m, D], y [m]) chunks of this rank's share of the rows (all of them with every_rank,
        or without torchrun), of those where `keep` (a mask over all rows) is true, in order."""
        start, stop = (0, len(self)) if every_rank else distributed.rank_rows(len(self))
        yield from self._chunks(start, stop, keep)

    def _spans(self, start: int, stop: int, size: int | None = None):
        """(part, first, last) spans of at most `size` (default chunk_rows) rows within positions start..stop-1."""
        size, offset = size or self.chunk_rows, 0
        for p, part in enumerate(self.parts):
            lo, hi = max(start, offset), min(stop, offset + len(part.rows))
            for a in range(lo, hi, size):
                yield p, a - offset, min(a + size, hi) - offset
            offset += len(part.rows)

    def _chunks(self, start: int, stop: int, keep: np.ndarray | None):
        offsets = np.cumsum([0] + [len(part.rows) for part in self.parts])
        for p, a, b in self._spans(start, stop):
            mask = None if keep is None else keep[offsets[p] + a:offsets[p] + b]
            if mask is not None and not mask.any():
                continue
            X, y = self._read(p, a, b), self.parts[p].labels[a:b]
            yield (X, y) if mask is None or mask.all() else (X[mask], y[mask])

    def _read(self, p: int, a: int, b: int, keep: bool = True) -> np.ndarray:
        if (p, a, b) in self._kept:
            return self._kept[p, a, b].astype(np.float32, copy=False)
        part = self.parts[p]
        rows = part.rows[a:b]
        if not self.path.exists():  # a kNN head streams its training rows from the cache it was fitted on
            raise ProbeError(f"the cache {self.path} is gone; this head reads its training rows from it: "
                             "extract it again, or fit again")
        try:
            with h5py.File(self.path, "r") as f:
                self._check(f)
                blocks = []
                for column in part.columns:
                    ds = f[column]
                    first, last = int(rows[0]), int(rows[-1]) + 1
                    if last - first <= 2 * len(rows):  # dense: one contiguous read, then the rows wanted
                        block = ds[part.view, first:last] if part.view is not None else ds[first:last]
                        blocks.append(block[rows - first])
                    else:  # sparse: h5py reads increasing row lists directly
                        blocks.append(ds[part.view, rows] if part.view is not None else ds[rows])
        except (OSError, KeyError) as e:
            raise ProbeError(f"cache {self.path} is corrupt ({e}); delete it and run probe extract again") from None
        raw = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, 1)
        if keep and self._kept_bytes + raw.nbytes <= self.resident_budget:
            self._kept[p, a, b] = raw
            self._kept_bytes += raw.nbytes
        return raw.astype(np.float32, copy=False)

    def minibatches(self, epoch: int, batch_size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shuffled minibatches for SGD: chunks read in a random order (seeded by seed and epoch) into a
        shuffle buffer of up to the resident budget, whose rows are drawn in random order; a file sorted
        by class is mixed across the whole buffer, not within one chunk."""
        rng = np.random.default_rng((seed, epoch))
        # The buffer (float32, and its shuffled copy) within a quarter of the budget; spans small enough
        # that a buffer mixes at least 16 of them from all over the file.
        buffer_rows = max(batch_size, self.resident_budget // (16 * max(1, self.dim)))
        spans = list(self._spans(0, len(self), max(batch_size, min(self.chunk_rows, buffer_rows // 16))))
        X_parts, y_parts, held = [], [], 0
        for i in rng.permutation(len(spans)):
            p, a, b = spans[i]
            X_parts.append(self._read(p, a, b))
            y_parts.append(self.parts[p].labels[a:b])
            held += b - a
            if held < buffer_rows:
                continue
            X, y = np.concatenate(X_parts), np.concatenate(y_parts)
            order = rng.permutation(len(y))
            full = len(order) // batch_size * batch_size
            for j in range(0, full, batch_size):
                yield X[order[j:j + batch_size]], y[order[j:j + batch_size]]
            X_parts, y_parts, held = [X[order[full:]]], [y[order[full:]]], len(order) - full
        if held:
            X, y = np.concatenate(X_parts), np.concatenate(y_parts)
            order = rng.permutation(len(y))
            for j in range(0, len(order), batch_size):
                yield X[order[j:j + batch_size]], y[order[j:j + batch_size]]

    def load(self) -> np.ndarray:
        """Every row in memory as float32 (the in-memory fit), filled a chunk at a time: no second copy, and
        nothing kept of the chunks."""
        out, row = np.empty((len(self), self.dim), np.float32), 0
        for p, a, b in self._spans(0, len(self)):
            out[row:row + b - a] = self._read(p, a, b, keep=False)
            row += b - a
        return out


def parse_bytes(text: str | int | None) -> int | None:
    """'2GB', '512MiB', '1.5G', '3000000' -> bytes (GB and GiB alike are powers of 1024 here)."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    try:
        value = float(number) * units[s[len(number):]]
    except (ValueError, KeyError):
        raise ProbeError(f"--max-memory {text!r}: give bytes or a size such as 2GB or 512MB") from None
    if not math.isfinite(value):
        raise ProbeError(f"--max-memory {text!r}: give bytes or a size such as 2GB or 512MB")
    if value < 1 << 20:
        raise ProbeError(f"--max-memory {text}: give at least 1MB")
    return int(value)
