"""Image folders (`folder:PATH`: PATH/train/<class>/* and optionally PATH/test/<class>/*) and the
bundled sample, an image folder of 1,000 training and 500 test images of the JPEG CIFAR-10."""

from __future__ import annotations

from pathlib import Path

from probe.datasets.base import HELD_OUT, IMAGE_EXTENSIONS, OFFICIAL_TEST, ImageDataset, file_splits, image_files
from probe.errors import ProbeError

SAMPLE_DIR = Path(__file__).parent / "sample"


def load_folder(path: Path, name: str) -> ImageDataset:
    """An image folder: PATH/train/<class>/* and optionally PATH/test/<class>/*."""
    if not (path / "train").is_dir():
        raise ProbeError(f"{path} is not an image folder data set: expected {path}/train/<class>/ (and test/<class>/)")
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    if not classes:
        raise ProbeError(f"{path}/train has no class folders")
    splits = {}
    for split in ("train", "test"):
        if not (path / split).is_dir():
            continue
        found = sorted(d.name for d in (path / split).iterdir() if d.is_dir())
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ProbeError(f"{path}/{split} has classes that train lacks: {', '.join(unknown)}")
        paths, labels = [], []
        for label, cls in enumerate(classes):
            folder = path / split / cls
            files = image_files(folder)
            if split == "train" and not files:  # a class no head can learn, and one that shifts every label after it
                raise ProbeError(f"{folder} has no images (extensions: {' '.join(IMAGE_EXTENSIONS)}); add some or "
                                 "remove the folder")
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise ProbeError(f"{path}/{split} has no images (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        splits[split] = (paths, labels)
    splits, fingerprint = file_splits(splits, lambda split, f, label: f"{split}/{classes[label]}/{Path(f).name}")
    return ImageDataset(name, classes, splits, fingerprint, OFFICIAL_TEST if "test" in splits else HELD_OUT)


def load(spec: str, data_dir: Path, download: bool, options: dict) -> ImageDataset:
    path = Path(spec).expanduser()
    return load_folder(path, name=f"folder:{path.resolve()}")


def load_sample(data_dir: Path, download: bool) -> ImageDataset:
    return load_folder(SAMPLE_DIR, name="sample")
