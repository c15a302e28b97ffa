"""What every data set source gives: labelled splits of images, class names, a fingerprint, a protocol.

A split holds its images either decoded in one uint8 array (`pixels`: CIFAR-sized images, or a data
set stored as one array) or as an image source that decodes one image on access (`images`: files,
rows of a Hugging Face data set, members of tar shards), so that a data set larger than memory is
never held decoded at once; DataLoader workers decode those.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from probe import distributed, memo
from probe.errors import ProbeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
OFFICIAL_TEST = "the data set's test split"
HELD_OUT = "held out of train by probe fit"  # a data set without a test split


class ImageSource(Protocol):
    """Images decoded one at a time: len(), read(i) -> uint8 [H, W, 3], name(i), subset(rows)."""

    def __len__(self) -> int: ...
    def read(self, i: int) -> np.ndarray: ...
    def name(self, i: int) -> str: ...
    def subset(self, rows) -> "ImageSource": ...


class ImageFiles:
    """Image files, decoded on access."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        return read_image(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i]

    def subset(self, rows) -> "ImageFiles":
        return ImageFiles([self.paths[i] for i in rows])


@dataclass
class Split:
    """One split: labels, and the images, decoded (`pixels`) or decoded on access (`images`)."""

    labels: np.ndarray  # int64 [N]
    pixels: np.ndarray | None = None  # uint8 [N, H, W, 3]
    images: ImageSource | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray:
        return self.pixels[i] if self.pixels is not None else self.images.read(i)

    def subset(self, rows) -> "Split":
        rows = np.asarray(rows, dtype=np.int64)
        return Split(self.labels[rows], None if self.pixels is None else self.pixels[rows],
                     None if self.images is None else self.images.subset(rows))


@dataclass
class ImageDataset:
    name: str  # as given on the command line, with a folder path made absolute
    classes: list[str]
    splits: dict[str, Split]  # "train" and, where the data set has one, "test"
    fingerprint: str  # changes when the images or labels change
    protocol: str = OFFICIAL_TEST  # how the test split was made (recorded in the cache and metrics.json)
    captions: list[list[str]] | None = None  # a caption data set's: each image's captions (probe retrieval)
    masks: dict | None = None  # a segmentation set's: {split: MaskFiles} (probe.datasets.segmentation)
    wnids: list[str] | None = None  # ImageNet's: each class's WordNet id (what shift sets are matched by)
    groups: list[list[str]] | None = None  # a shift set's: the ImageNet classes (WordNet ids) of each class


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (by extension), sorted; none where the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; grayscale, palette and RGBA are converted."""
    try:
        with open(path, "rb") as f:
            return decode_image(f, str(path))
    except OSError as e:
        raise ProbeError(f"cannot read image {path}: {e.strerror or e}; delete or replace that file") from None


def decode_image(data: bytes | io.BufferedIOBase, name: str) -> np.ndarray:
    """Decode encoded image bytes (or an open file) to uint8 RGB [H, W, 3]; `name` is for the error."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about palette transparency on convert
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ProbeError(f"cannot read image {name}: {e.__class__.__name__}: {e}; delete or replace that file") from None


def files_fingerprint(files: list[tuple[str, str | Path]]) -> str:
    """A hash of every file's place (split/class/name) and content: any image replaced, added, removed or
    moved to another class gives another fingerprint, whatever its size or modification time. The files
    are read once: while their stat signature stays the same, the next call takes the hash from the memo
    (probe/memo.py says why a changed file cannot keep its signature)."""
    def content(path) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as e:
            raise ProbeError(f"cannot read {path}: {e.strerror or e}") from None
        return digest.digest()

    def fingerprint() -> str:
        key, settled = memo.signature("files_fingerprint", files)  # unchanged files: the last command's result
        known = memo.get(key)
        if known is not None and re.fullmatch(rb"[0-9a-f]{16}", known):
            return known.decode()
        digest = hashlib.sha256()
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # reads release the GIL
            for (place, _), file_digest in zip(files, pool.map(content, [f for _, f in files], chunksize=256)):
                digest.update(place.encode() + b"\0" + file_digest)
        value = digest.hexdigest()[:16]
        if settled:
            memo.put(key, value.encode())
        return value

    # Under torchrun rank 0 reads the files and the others take its fingerprint: one process's cost.
    return distributed.on_main(fingerprint)


def arrays_fingerprint(splits: dict[str, Split]) -> str:
    """A hash of the decoded pixels and labels of splits held as arrays."""
    digest = hashlib.sha256()
    for name, split in splits.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(split.pixels).data)
        digest.update(split.labels.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def file_splits(splits: dict[str, tuple[list, list]], place) -> tuple[dict[str, Split], str]:
    """Splits of image files from {split: (paths, labels)}, and their fingerprint; place(split, path,
    label) names a file's place in the data set (what moving a file changes)."""
    out, places = {}, []
    for name, (paths, labels) in splits.items():
        out[name] = Split(np.asarray(labels, dtype=np.int64), images=ImageFiles(paths))
        places += [(place(name, p, label), p) for p, label in zip(paths, labels)]
    return out, files_fingerprint(places)


def relative_place(root: Path):
    """place() for file_splits: split/label/path relative to root."""
    def place(split: str, path, label: int) -> str:
        try:
            return f"{split}/{label}/{Path(path).relative_to(root)}"
        except ValueError:
            return f"{split}/{label}/{path}"
    return place


def seeded_split(labels: np.ndarray, *, seed: int = 0, train_per_class: int | None = None,
                 test_per_class: int | None = None, test_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of a data set without an official split, per class and seeded.

    train_per_class: that many of each class train (all but one where a class has fewer), and
    test_per_class of the rest (default: all of them) test; test_fraction: that share of each class
    tests (at least one). Rows come back sorted, so the split's order follows the data set's own.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if test_fraction is not None:
            n_test = min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
            train.append(rows[n_test:])
            test.append(rows[:n_test])
            continue
        n_train = min(train_per_class, len(rows) - 1)
        train.append(rows[:n_train])
        test.append(rows[n_train:][:test_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@contextmanager
def cleanup_on_failure(root: Path):
    """Remove what a failed or interrupted download created under root (empty folders, a partial archive),
    so that nothing half-written is left; what was there before stays."""
    existed = root.is_dir()
    before = set(root.iterdir()) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:  # the download made root itself
            shutil.rmtree(root, ignore_errors=True)
            raise
        for entry in set(root.iterdir()) - before:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise
