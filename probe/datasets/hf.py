"""Hugging Face data sets: `hf:<hub name or local folder>[@config]`.

A local folder is a `save_to_disk` folder or a folder of data files `datasets.load_dataset` reads
(parquet, or an image folder); any other name is a hub data set, from the hub cache when offline
(HF_HUB_OFFLINE=1). The image column is the one whose feature is an Image, the label column the
ClassLabel one (its names become the class names); `--image-column` and `--label-column` override.
Training uses the `train` split; evaluation `test`, else `validation` (the first of them that has
labels at all: an unlabelled Kaggle-style test split is passed over); rows of it without a label, or
with a label no training row has, are left out with a warning that names them, and the protocol says
so. With neither, `probe fit` holds out a test split as for image folders. A local folder's rows come
from a `datasets` cache keyed by probe's content fingerprint, never from one kept by modification time. Images are
decoded from their stored bytes one at a time, in DataLoader workers for large ones.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from probe.datasets.base import HELD_OUT, ImageDataset, Split, decode_image, files_fingerprint, read_image
from probe.errors import ProbeError, library_logs_quiet

EVALUATION_SPLITS = ("test", "validation", "valid", "val")
log = logging.getLogger("probe")


class HFImages:
    """The image column of a Hugging Face data set, decoded from its bytes on access."""

    def __init__(self, dataset, column: str, label: str):
        self.dataset, self.column, self.label = dataset, column, label

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int) -> np.ndarray:
        cell = self.dataset[int(i)][self.column]
        if cell.get("bytes"):
            return decode_image(cell["bytes"], self.name(i))
        if cell.get("path"):
            return read_image(cell["path"])
        raise ProbeError(f"{self.name(i)} has no image")

    def name(self, i: int) -> str:
        return f"row {int(i)} of the {self.label} split"

    def subset(self, rows) -> "HFImages":
        return HFImages(self.dataset.select(np.asarray(rows, dtype=np.int64)), self.column, self.label)


def load(spec: str, data_dir: Path, download: bool, options: dict) -> ImageDataset:
    try:
        import datasets
    except ImportError:
        raise ProbeError('--dataset hf:... needs the datasets library: pip install "probe[hf]"') from None
    name, _, config = spec.partition("@")
    path = Path(name).expanduser()
    if logging.getLogger("probe").getEffectiveLevel() > logging.INFO:  # probe -q
        datasets.disable_progress_bars()
    if path.exists() and not path.is_dir():
        raise ProbeError(f"hf:{name} is a file; give a save_to_disk folder, a folder of data files or a hub name")
    # A local folder's content fingerprint comes first: datasets' own cache of data files (its Arrow files)
    # is kept by file name and modification time, so a file replaced with the same time (cp -p, rsync -a)
    # would give the old rows. Each content gets a cache folder of its own, named by probe's fingerprint.
    files = _local_files(path) if path.exists() else []
    content = files_fingerprint([(str(p.relative_to(path)), p) for p in files]) if files else ""
    try:
        with library_logs_quiet():
            if path.exists():
                saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
                arrow_cache = Path(datasets.config.HF_DATASETS_CACHE) / "probe" / content
                loaded = datasets.load_from_disk(str(path)) if saved else \
                    datasets.load_dataset(str(path), config or None, cache_dir=str(arrow_cache))
                canonical = f"hf:{path.resolve()}"
            else:
                loaded = datasets.load_dataset(name, config or None)
                canonical = f"hf:{name}"
    except ProbeError:
        raise
    except Exception as e:  # hub, network, format errors come in many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = "folder" if path.exists() else "data set"
        raise ProbeError(f"could not load Hugging Face {where} {name!r} ({type(e).__name__}: {reason}). Offline: fill "
                         "the hub cache ($HF_HOME) on a connected machine and set HF_HUB_OFFLINE=1, or give hf:FOLDER "
                         "(a save_to_disk folder or parquet files) or folder:PATH (an image folder)") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded:
        if len(loaded) != 1:
            raise ProbeError(f"hf:{name} has no train split (it has {', '.join(loaded)})")
        loaded = datasets.DatasetDict({"train": next(iter(loaded.values()))})
    train = loaded["train"]
    image_column = options.get("image_column") or _column(train, datasets.Image, "image", name)
    label_column = options.get("label_column") or _column(train, datasets.ClassLabel, "label", name)
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise ProbeError(f"hf:{name} has no column {column!r}: it has {', '.join(train.column_names)}")
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        classes, to_index = list(feature.names), None
    else:  # plain ints or strings: the sorted distinct values of the training split
        values = sorted({v for v in train[label_column]}, key=lambda v: (str(type(v)), v))
        classes, to_index = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    splits, protocol = {}, None
    for split in ("train", *EVALUATION_SPLITS):
        if split not in loaded or (split != "train" and "test" in splits):
            continue
        data = loaded[split]
        values = data[label_column]
        unlabelled = np.asarray([v is None or (to_index is None and v == -1) for v in values])
        labels = np.asarray([-1 if u else v if to_index is None else to_index.get(v, -2)
                             for v, u in zip(values, unlabelled)], dtype=np.int64)
        if split == "train":
            if (labels < 0).any():
                raise ProbeError(f"hf:{name}: {int((labels < 0).sum())} training rows have no label in {label_column!r}")
        elif unlabelled.all():  # an unlabelled test split (as on Kaggle): the next one evaluates
            continue
        description = f"the Hugging Face data set's {split} split"
        images = data.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        source = HFImages(images, image_column, split)
        if split != "train" and (labels < 0).any():
            # The official split stays the test split: rows without a label, or with one that no training
            # row has (no head can learn it), are left out, said, and recorded in the protocol.
            dropped = np.flatnonzero(labels < 0)
            unseen = sorted({str(values[i]) for i in dropped if labels[i] == -2})
            log.warning(f"hf:{name}: {len(dropped)} of {len(labels)} {split} rows left out of the test split "
                        f"(rows {', '.join(map(str, dropped[:8]))}{', ...' if len(dropped) > 8 else ''}): "
                        + (f"labels not in train: {', '.join(unseen[:8])}" if unseen else "no label"))
            kept = np.flatnonzero(labels >= 0)
            labels, source = labels[kept], source.subset(kept)
            description += f", less {len(dropped)} rows whose label is missing or not in train (rows {_ranges(dropped)})"
        splits["train" if split == "train" else "test"] = Split(labels, images=source)
        protocol = protocol if split == "train" else description
    fingerprint = _fingerprint(loaded, content, config, image_column, label_column)
    canonical += f"@{config}" if config else ""
    return ImageDataset(canonical, classes, splits, fingerprint, protocol or HELD_OUT)


def _column(data, kind, what: str, name: str) -> str:
    found = [c for c, f in data.features.items() if isinstance(f, kind)]
    if not found and what == "label":
        found = [c for c in ("label", "labels") if c in data.column_names]
    if not found:
        raise ProbeError(f"hf:{name} has no {what} column that probe can find ({', '.join(data.column_names)}); "
                         f"name it with --{what}-column")
    return found[0]


def _local_files(path: Path) -> list[Path]:
    """A local data set folder's own files: its caches (a `.cache` folder inside it) and locks left out."""
    return sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts
                  and not p.name.endswith(".lock"))


def _ranges(rows: np.ndarray) -> str:
    """Row numbers as compact ranges: 3-5, 9."""
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _fingerprint(loaded, content: str, config: str, image_column: str, label_column: str) -> str:
    """The content of the data set's files (a local folder's own, else the Arrow cache files), its split
    names and the columns chosen."""
    digest = hashlib.sha256(f"{config}\0{image_column}\0{label_column}\0{','.join(loaded)}".encode())
    if content:
        digest.update(content.encode())
    else:
        cached = sorted({f["filename"] for d in loaded.values() for f in d.cache_files})
        digest.update(files_fingerprint([(Path(f).name, f) for f in cached]).encode())
    return digest.hexdigest()[:16]
