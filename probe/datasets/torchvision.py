"""The torchvision data sets of the standard transfer suites (Kornblith et al. 2019; the CLIP paper's
linear probes; VTAB), by name, in torchvision's on-disk layout under --data-dir, downloaded by
torchvision when missing.

Where torchvision's class reads a layout without demanding the official files' MD5s, it is the reader
(its file lists and labels, so the layout is exactly torchvision's); STL-10, SVHN and Flowers-102 are
stored as arrays or .mat files whose MD5s it checks, so those few lines of reading are here, and
torchvision only downloads them. Each entry states its split protocol: where a data set has
train/val/test, training uses train + val where the published protocol does; where it has no
official split, a seeded per-class split after a published convention (seed 0, fixed: the split is
part of the data set, so every cache and every head of it sees the same one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from probe.datasets.base import (ImageDataset, Split, arrays_fingerprint, cleanup_on_failure, file_splits,
                                 relative_place, seeded_split)
from probe.errors import ProbeError


def _tv(cls_name: str, root: Path, download: bool, **kwargs):
    """torchvision's data set class on root, downloading (torchvision's own download) when missing."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    with cleanup_on_failure(root):  # some classes make their folder before looking (Caltech101)
        try:
            return cls(str(root), download=False, **kwargs)
        except RuntimeError:  # "Dataset not found (or corrupted). You can use download=True"
            if not download:
                raise ProbeError(f"{cls_name} is not in {root}/ in torchvision's layout; run probe extract (it "
                                 "downloads it) or give --data-dir") from None
        try:
            return cls(str(root), download=True, **kwargs)
        except Exception as e:  # network errors, a bad checksum, gdown missing: many types
            raise _download_error(cls_name, root, e) from None


def _download_error(what: str, root: Path, e: Exception) -> ProbeError:
    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return ProbeError(f"could not download {what} into {root}/ ({type(e).__name__}: {reason}). Without network: put it "
                      "there in torchvision's layout (--data-dir), or use an image folder (--dataset folder:PATH) or "
                      "a Hugging Face data set folder (--dataset hf:FOLDER)")


def _files(name: str, root: Path, splits: dict[str, list], classes: list[str], protocol: str) -> ImageDataset:
    """A data set of files from {split: [torchvision data set objects]}, via their (path, label) lists."""
    pairs = {split: [pair for part in parts for pair in _pairs(part)] for split, parts in splits.items()}
    built, fingerprint = file_splits({s: ([p for p, _ in v], [lab for _, lab in v]) for s, v in pairs.items()},
                                     relative_place(root))
    return ImageDataset(name, list(classes), built, fingerprint, protocol)


def _pairs(part) -> list[tuple[str, int]]:
    """(path, label) of every image of a torchvision data set object or a list of pairs."""
    if isinstance(part, list):
        return part
    for files, labels in (("_image_files", "_labels"), ("_images", "_labels")):  # DTD, Food101, ...; OxfordIIITPet
        if hasattr(part, files):
            return [(str(f), int(lab)) for f, lab in zip(getattr(part, files), getattr(part, labels))]
    for samples in ("samples", "_samples"):  # ImageFolder (EuroSAT); GTSRB
        if hasattr(part, samples):
            return [(str(f), int(lab)) for f, lab in getattr(part, samples)]
    raise TypeError(f"no file list in {type(part).__name__}")


def _held_out(name: str, root: Path, pairs: list[tuple[str, int]], classes: list[str], protocol: str,
              **rule) -> ImageDataset:
    """A data set without an official split: seeded_split(**rule) of its images."""
    labels = np.array([lab for _, lab in pairs], dtype=np.int64)
    train, test = seeded_split(labels, **rule)
    return _files(name, root, {"train": [[pairs[i] for i in train]], "test": [[pairs[i] for i in test]]}, classes,
                  protocol)


def stl10(root: Path, download: bool) -> ImageDataset:
    folder = root / "stl10_binary"
    if not (folder / "train_X.bin").is_file():
        _download_only("STL10", root, download, split="train")
    try:
        classes = (folder / "class_names.txt").read_text().split()
        splits = {}
        for split in ("train", "test"):
            labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            # Stored column-major per channel: [N, 3, 96, 96] with H and W swapped, as torchvision reads it.
            pixels = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
            if len(pixels) != len(labels):
                raise ValueError(f"{len(pixels)} images and {len(labels)} labels in {split}")
            splits[split] = Split(labels, pixels=np.ascontiguousarray(pixels))
    except (OSError, ValueError) as e:
        raise _damaged("stl10", folder, e) from None
    return ImageDataset("stl10", classes, splits, arrays_fingerprint(splits), PROTOCOLS["stl10"])


def svhn(root: Path, download: bool) -> ImageDataset:
    from scipy.io import loadmat

    splits = {}
    for split in ("train", "test"):
        path = root / f"{split}_32x32.mat"
        if not path.is_file():
            _download_only("SVHN", root, download, split=split)
        try:
            mat = loadmat(path)
            labels = mat["y"].astype(np.int64).reshape(-1)
            labels[labels == 10] = 0  # the digit 0 is stored as label 10
            splits[split] = Split(labels, pixels=np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)))
        except (OSError, ValueError, KeyError) as e:
            raise _damaged("svhn", path, e) from None
    return ImageDataset("svhn", [str(d) for d in range(10)], splits, arrays_fingerprint(splits), PROTOCOLS["svhn"])


def flowers102(root: Path, download: bool) -> ImageDataset:
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    folder = root / "flowers-102"
    if not (folder / "setid.mat").is_file():
        _download_only("Flowers102", root, download, split="train")
    try:
        labels = loadmat(folder / "imagelabels.mat", squeeze_me=True)["labels"].astype(np.int64) - 1
        ids = loadmat(folder / "setid.mat", squeeze_me=True)
        pairs = {s: [(str(folder / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1])) for i in np.atleast_1d(ids[key])]
                 for s, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise _damaged("flowers102", folder, e) from None
    return _files("flowers102", root, {"train": [pairs["train"], pairs["val"]], "test": [pairs["test"]]},
                  Flowers102.classes, PROTOCOLS["flowers102"])


def _download_only(cls_name: str, root: Path, download: bool, **kwargs) -> None:
    """Download with torchvision's class (it checks the MD5s); the files are then read here."""
    if not download:
        raise ProbeError(f"{cls_name} is not in {root}/ in torchvision's layout; run probe extract (it downloads it) "
                         "or give --data-dir")
    import torchvision.datasets as tvd

    try:
        with cleanup_on_failure(root):
            getattr(tvd, cls_name)(str(root), download=True, **kwargs)
    except Exception as e:
        raise _download_error(cls_name, root, e) from None


def _damaged(name: str, path: Path, e: Exception) -> ProbeError:
    return ProbeError(f"{name} in {path} is incomplete or damaged ({type(e).__name__}: {e}); delete it to download "
                      "it again")


def dtd(root: Path, download: bool) -> ImageDataset:
    parts = {s: _tv("DTD", root, download, split=s, partition=1) for s in ("train", "val", "test")}
    return _files("dtd", root, {"train": [parts["train"], parts["val"]], "test": [parts["test"]]},
                  parts["train"].classes, PROTOCOLS["dtd"])


def oxford_pets(root: Path, download: bool) -> ImageDataset:
    parts = {s: _tv("OxfordIIITPet", root, download, split=s) for s in ("trainval", "test")}
    return _files("oxford_pets", root, {"train": [parts["trainval"]], "test": [parts["test"]]},
                  parts["trainval"].classes, PROTOCOLS["oxford_pets"])


def food101(root: Path, download: bool) -> ImageDataset:
    parts = {s: _tv("Food101", root, download, split=s) for s in ("train", "test")}
    return _files("food101", root, {"train": [parts["train"]], "test": [parts["test"]]}, parts["train"].classes,
                  PROTOCOLS["food101"])


def fgvc_aircraft(root: Path, download: bool) -> ImageDataset:
    parts = {s: _tv("FGVCAircraft", root, download, split=s, annotation_level="variant") for s in ("trainval", "test")}
    return _files("fgvc_aircraft", root, {"train": [parts["trainval"]], "test": [parts["test"]]},
                  parts["trainval"].classes, PROTOCOLS["fgvc_aircraft"])


def gtsrb(root: Path, download: bool) -> ImageDataset:
    from torchvision.datasets.folder import find_classes

    parts = {s: _tv("GTSRB", root, download, split=s) for s in ("train", "test")}
    classes, _ = find_classes(str(root / "gtsrb" / "GTSRB" / "Training"))  # the class folders 00000..00042
    return _files("gtsrb", root, {"train": [parts["train"]], "test": [parts["test"]]}, classes, PROTOCOLS["gtsrb"])


def eurosat(root: Path, download: bool) -> ImageDataset:
    data = _tv("EuroSAT", root, download)
    return _held_out("eurosat", root, _pairs(data), data.classes, PROTOCOLS["eurosat"], test_fraction=0.2)


def caltech101(root: Path, download: bool) -> ImageDataset:
    data = _tv("Caltech101", root, download, target_type="category")
    folder = Path(data.root) / "101_ObjectCategories"
    pairs = [(str(folder / data.categories[y] / f"image_{i:04d}.jpg"), int(y)) for y, i in zip(data.y, data.index)]
    return _held_out("caltech101", root, pairs, data.categories, PROTOCOLS["caltech101"], train_per_class=30)


def sun397(root: Path, download: bool) -> ImageDataset:
    data = _tv("SUN397", root, download)
    # rglob's order depends on the file system: sort, so the seeded split is the same everywhere.
    pairs = sorted(_pairs(data))
    return _held_out("sun397", root, pairs, data.classes, PROTOCOLS["sun397"], train_per_class=50, test_per_class=50)


PROTOCOLS = {
    "stl10": "official: train (5,000 labelled images; the unlabelled split is not used), test",
    "svhn": "official: train, test (the 'extra' split is not used)",
    "flowers102": "official: train + val for training, test (Kornblith et al. 2019)",
    "dtd": "official partition 1: train + val for training, test (Kornblith et al. 2019)",
    "oxford_pets": "official: trainval, test (37 breeds)",
    "food101": "official: train, test",
    "fgvc_aircraft": "official: trainval, test, at the variant level (100 classes)",
    "gtsrb": "official: train (GTSRB/Training), test (Final_Test with GT-final_test.csv)",
    "eurosat": "no official split: 80% of each class for training, 20% test, seeded (seed 0), after Helber et al. 2019",
    "caltech101": "no official split: 30 images of each class for training, the rest test, seeded (seed 0), "
                  "BACKGROUND_Google excluded (Fei-Fei et al. 2004; Kornblith et al. 2019)",
    "sun397": "no official split in torchvision's download: 50 images of each class for training and 50 for test, "
              "seeded (seed 0), the size of each of Xiao et al.'s ten published partitions",
}

# name: (loader, classes, published (train, test) sizes under the protocol, where under --data-dir)
DATASETS: dict[str, tuple[Callable[[Path, bool], ImageDataset], int, tuple[int, int], str]] = {
    "stl10": (stl10, 10, (5000, 8000), "stl10_binary/"),
    "svhn": (svhn, 10, (73257, 26032), "train_32x32.mat, test_32x32.mat"),
    "flowers102": (flowers102, 102, (2040, 6149), "flowers-102/"),
    "dtd": (dtd, 47, (3760, 1880), "dtd/dtd/"),
    "oxford_pets": (oxford_pets, 37, (3680, 3669), "oxford-iiit-pet/"),
    "food101": (food101, 101, (75750, 25250), "food-101/"),
    "fgvc_aircraft": (fgvc_aircraft, 100, (6667, 3333), "fgvc-aircraft-2013b/"),
    "gtsrb": (gtsrb, 43, (26640, 12630), "gtsrb/GTSRB/"),
    "eurosat": (eurosat, 10, (21600, 5400), "eurosat/2750/"),
    "caltech101": (caltech101, 101, (3030, 5647), "caltech101/101_ObjectCategories/"),
    "sun397": (sun397, 397, (19850, 19850), "SUN397/"),
}
