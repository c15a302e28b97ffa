"""Hugging Face data sets: `hf:<hub name or local folder>[@config]`.

A local folder is a `save_to_disk` folder or a folder of data files `datasets.load_dataset` reads
(parquet, or an image folder); any other name is a hub data set, from the hub cache when offline
(HF_HUB_OFFLINE=1). The image column is the one whose feature is an Image, the label column the
ClassLabel one (its names become the class names); `--image-column` and `--label-column` override.
Training uses the `train` split; evaluation `test`, else `validation` (the first of them whose labels
are all there); with neither, `probe fit` holds out a test split as for image folders. Images are
decoded from their stored bytes one at a time, in DataLoader workers for large ones.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from probe.datasets.base import ImageDataset, Split, decode_image, files_fingerprint, read_image
from probe.errors import ProbeError, library_logs_quiet

EVALUATION_SPLITS = ("test", "validation", "valid", "val")


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
    try:
        with library_logs_quiet():
            if path.exists():
                saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
                loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), config or None)
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
        labels = np.asarray(data[label_column] if to_index is None else
                            [to_index.get(v, -1) for v in data[label_column]], dtype=np.int64)
        if split != "train" and (labels < 0).any():  # an unlabelled test split (as on Kaggle): try the next one
            continue
        if (labels < 0).any():
            raise ProbeError(f"hf:{name}: {int((labels < 0).sum())} training rows have no label in {label_column!r}")
        images = data.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        splits["train" if split == "train" else "test"] = Split(labels, images=HFImages(images, image_column, split))
        protocol = protocol if split == "train" else f"the Hugging Face data set's {split} split"
    fingerprint = _fingerprint(loaded, path, config, image_column, label_column)
    canonical += f"@{config}" if config else ""
    return ImageDataset(canonical, classes, splits, fingerprint, protocol or "held out of train by probe fit")


def _column(data, kind, what: str, name: str) -> str:
    found = [c for c, f in data.features.items() if isinstance(f, kind)]
    if not found and what == "label":
        found = [c for c in ("label", "labels") if c in data.column_names]
    if not found:
        raise ProbeError(f"hf:{name} has no {what} column that probe can find ({', '.join(data.column_names)}); "
                         f"name it with --{what}-column")
    return found[0]


def _fingerprint(loaded, path: Path, config: str, image_column: str, label_column: str) -> str:
    """The content of the data set's files (a local folder's own, else the Arrow cache files), its split
    names and the columns chosen."""
    digest = hashlib.sha256(f"{config}\0{image_column}\0{label_column}\0{','.join(loaded)}".encode())
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts and not p.name.endswith(".lock"))
        digest.update(files_fingerprint([(str(p.relative_to(path)), p) for p in files]).encode())
    else:
        cached = sorted({f["filename"] for d in loaded.values() for f in d.cache_files})
        digest.update(files_fingerprint([(Path(f).name, f) for f in cached]).encode())
    return digest.hexdigest()[:16]
