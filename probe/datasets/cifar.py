"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format (the python pickled batches), downloaded
with torchvision's MD5-checked download when missing.

They are read here, not through torchvision's classes, because those demand the official files'
MD5s, which a copy of the batches (or a test's fixture) does not have.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from probe.datasets.base import ImageDataset, Split, arrays_fingerprint, cleanup_on_failure
from probe.errors import ProbeError

# name: (torchvision class, folder, {split: files}, meta file, label key, class names key)
LAYOUTS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", "labels", "label_names"),
    "cifar100": ("CIFAR100", "cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_labels",
                 "fine_label_names"),
}
CIFAR10_FOLDER = LAYOUTS["cifar10"][1]
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def load(name: str, root: Path, download: bool) -> ImageDataset:
    """CIFAR-10 or -100 (fine labels) under root/, downloaded (MD5-checked) when missing."""
    tv_class, folder_name, files, meta, label_key, names_key = LAYOUTS[name]
    folder = root / folder_name
    if not folder.is_dir():
        if not download:
            raise ProbeError(f"{TITLES[name]} is not in {folder}; run probe extract (it downloads it) or give --data-dir")
        _download(name, tv_class, root)
    try:
        classes = _unpickle(folder / meta)[names_key]
        splits = {}
        for split, batch_files in files.items():
            batches = [_unpickle(folder / f) for f in batch_files]
            pixels = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
            splits[split] = Split(labels=labels, pixels=np.ascontiguousarray(pixels, dtype=np.uint8))
    except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ProbeError(f"{TITLES[name]} in {folder} is incomplete or damaged ({type(e).__name__}: {e}); "
                         "delete that folder to download it again") from None
    if name == "cifar10":  # the fingerprint of probe 0.1-0.3, so their CIFAR-10 caches keep their names
        fingerprint = _legacy_fingerprint(splits)
    else:
        fingerprint = arrays_fingerprint(splits)
    return ImageDataset(name, list(classes), splits, fingerprint)


def _legacy_fingerprint(splits: dict[str, Split]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for split in splits.values():
        digest.update(split.pixels.tobytes())
        digest.update(split.labels.tobytes())
    return digest.hexdigest()[:16]


def _download(name: str, tv_class: str, root: Path) -> None:
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(tvd, tv_class)
    url = os.environ.get("PROBE_CIFAR10_URL", cls.url) if name == "cifar10" else cls.url  # a mirror, for blocked hosts
    try:
        with cleanup_on_failure(root):
            download_and_extract_archive(url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum is a RuntimeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProbeError(
            f"could not download {TITLES[name]} into {root}/ ({reason}). Without network: put the python batches "
            f"in {root}/{LAYOUTS[name][1]} (--data-dir), use an image folder (--dataset folder:PATH), "
            "a Hugging Face data set folder (--dataset hf:FOLDER), or the bundled sample (--dataset sample)"
        ) from None


def _unpickle(path: Path) -> dict:
    # CIFAR's own format is a pickle; like torchvision, read it only from the official archive or your own copy.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")
