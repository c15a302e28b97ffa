"""Image data sets: CIFAR-10, image folders and the bundled sample, and the one preprocessing path.

A data set is two splits of labelled images. Small images (CIFAR-sized) are decoded once into one
uint8 array and resized on the device in batches; large images stay as file paths and are decoded
and resized in DataLoader workers. Both paths use `resize_center_crop`, and so does `probe predict`,
so an image gets the same pixels whichever way it reaches the backbone.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from probe.errors import ProbeError
from probe.preprocess import Preprocess, resize_center_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SAMPLE_DIR = Path(__file__).parent / "sample"
# Images at most this many pixels on a side are decoded up front into one array.
SMALL_IMAGE_SIDE = 64
DATASETS = ("cifar10", "sample", "folder:PATH")


@dataclass
class Split:
    """One split: labels, and either decoded pixels (small images) or file paths (large ones)."""

    labels: np.ndarray  # int64 [N]
    pixels: np.ndarray | None = None  # uint8 [N, H, W, 3]
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> "Split":
        return Split(self.labels[rows], None if self.pixels is None else self.pixels[rows],
                     None if self.paths is None else [self.paths[i] for i in rows])


@dataclass
class ImageDataset:
    name: str  # as given on the command line, with a folder path made absolute
    classes: list[str]
    splits: dict[str, Split]  # "train" and, where the data set has one, "test"
    fingerprint: str  # changes when the images or labels change


def load_dataset(name: str, data_dir: str | os.PathLike = "data", download: bool = True) -> ImageDataset:
    """Load a data set by name: "cifar10", "sample" or "folder:PATH"."""
    if name == "cifar10":
        return _load_cifar10(Path(data_dir), download)
    if name == "sample":
        return load_folder(SAMPLE_DIR, name="sample")
    if name.startswith("folder:"):
        path = Path(name[len("folder:"):]).expanduser()
        return load_folder(path, name=f"folder:{path.resolve()}")
    raise ProbeError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _load_cifar10(root: Path, download: bool) -> ImageDataset:
    """CIFAR-10 in torchvision's on-disk format under root/, downloaded (MD5-checked) when missing."""
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise ProbeError(f"CIFAR-10 is not in {folder}; run probe extract (it downloads it) or give --data-dir")
        _download_cifar10(root)
    try:
        classes = _unpickle(folder / "batches.meta")["label_names"]
        splits = {}
        for split, files in CIFAR10_FILES.items():
            batches = [_unpickle(folder / f) for f in files]
            pixels = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
            splits[split] = Split(labels=labels, pixels=np.ascontiguousarray(pixels, dtype=np.uint8))
    except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ProbeError(f"CIFAR-10 in {folder} is incomplete or damaged ({type(e).__name__}: {e}); "
                         "delete that folder to download it again") from None
    digest = hashlib.sha256()
    for split in splits.values():
        digest.update(split.pixels.tobytes())
        digest.update(split.labels.tobytes())
    return ImageDataset("cifar10", list(classes), splits, digest.hexdigest()[:16])


def _download_cifar10(root: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    url = os.environ.get("PROBE_CIFAR10_URL", CIFAR10.url)  # a mirror, for networks that block the original host
    try:
        download_and_extract_archive(url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum is a RuntimeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProbeError(
            f"could not download CIFAR-10 into {root}/ ({reason}). Without network: put the python batches "
            f"in {root}/{CIFAR10_FOLDER} (--data-dir), use an image folder (--dataset folder:PATH), "
            "or the bundled sample (--dataset sample)"
        ) from None


def _unpickle(path: Path) -> dict:
    # CIFAR-10's own format is a pickle; like torchvision, read it only from the official archive or your own copy.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_folder(path: Path, name: str) -> ImageDataset:
    """An image folder: PATH/train/<class>/* and optionally PATH/test/<class>/*."""
    if not (path / "train").is_dir():
        raise ProbeError(f"{path} is not an image folder data set: expected {path}/train/<class>/ (and test/<class>/)")
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    if not classes:
        raise ProbeError(f"{path}/train has no class folders")
    splits, files_in_order = {}, []
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
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
            files_in_order += [(f"{split}/{cls}/{f.name}", f) for f in files]
            paths += [str(f) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise ProbeError(f"{path}/{split} has no images (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        splits[split] = Split(labels=np.asarray(labels, dtype=np.int64), paths=paths)
    return ImageDataset(name, classes, splits, folder_fingerprint(files_in_order))


def folder_fingerprint(files: list[tuple[str, Path]]) -> str:
    """A hash of every file's place (split/class/name) and content: any image replaced, added, removed or
    moved to another class gives another fingerprint, whatever its size or modification time."""
    def content(path: Path) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as e:
            raise ProbeError(f"cannot read {path}: {e.strerror or e}") from None
        return digest.digest()

    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # file reads release the GIL
        for (place, _), file_digest in zip(files, pool.map(content, [f for _, f in files], chunksize=256)):
            digest.update(place.encode() + b"\0" + file_digest)
    return digest.hexdigest()[:16]


def decode_small(split: Split) -> Split:
    """Decode a split of small images, all of one size, into one uint8 array; leave anything else as paths."""
    if split.pixels is not None:
        return split
    first = read_image(split.paths[0])
    if max(first.shape[:2]) > SMALL_IMAGE_SIDE:
        return split
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL releases the GIL while decoding
        images = list(pool.map(read_image, split.paths, chunksize=256))
    if any(im.shape != first.shape for im in images):
        return split
    return Split(labels=split.labels, pixels=np.stack(images), paths=split.paths)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; grayscale, palette and RGBA are converted."""
    try:
        with Image.open(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about palette transparency on convert
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ProbeError(f"cannot read image {path}: {e.__class__.__name__}: {e}; delete or replace that file") from None


AUGMENTATIONS = ("rrc", "crop", "flip", "none")


def augment(images: torch.Tensor, pre: Preprocess, kind: str, rand: torch.Tensor) -> torch.Tensor:
    """Random crops and flips of a float batch [B, 3, H, W], resampled to pre.size x pre.size in one
    bilinear grid_sample.

    rand: [B, 5] uniform numbers, one row per image (area, aspect ratio, x, y, flip), so a view is a
    function of its numbers alone, whatever the batch. rrc: RandomResizedCrop(scale 0.6-1, ratio
    3/4-4/3) + flip. crop: RandomCrop(H, padding 4) + flip before the resize (the CIFAR recipe).
    flip: horizontal flip only. none: the evaluation transform `pre`.
    """
    if kind == "none":
        return resize_center_crop(images, pre)
    size = pre.size
    b, _, h, w = images.shape
    rand = rand.to(images.device)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    ones, zeros = torch.ones(b, device=images.device), torch.zeros(b, device=images.device)
    if kind == "rrc":
        area = 0.6 + 0.4 * rand[:, 0]
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand[:, 1])
        sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # fractions of width, height
        tx, ty = (1 - sx) * (2 * rand[:, 2] - 1), (1 - sy) * (2 * rand[:, 3] - 1)
    elif kind == "crop":  # a crop of the original size, shifted by up to 4 pixels, zero padding
        sx = sy = ones
        tx = (torch.round(8 * rand[:, 2]) - 4) * 2 / w
        ty = (torch.round(8 * rand[:, 3]) - 4) * 2 / h
    elif kind == "flip":
        sx, sy, tx, ty = ones, ones, zeros, zeros
    else:
        raise ProbeError(f"unknown augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def center_square(images: torch.Tensor) -> torch.Tensor:
    """The central square of images [..., H, W], of side min(H, W)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top:top + side, left:left + side]


class _DecodeResize(torch.utils.data.Dataset):
    """Worker-side path for large images: decode, then the evaluation transform's resize and crop."""

    def __init__(self, paths: list[str], pre: Preprocess):
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = torch.from_numpy(read_image(self.paths[i])).permute(2, 0, 1)[None].float()
        return resize_center_crop(image, self.pre)[0]


def iter_batches(split: Split, pre: Preprocess, batch_size: int, device: torch.device, start: int = 0,
                 num_workers: int | None = None, transform=None):
    """Yield float image batches [B, 3, pre.size, pre.size] in [0, 255] on `device`, from row `start` on.

    transform(images, row): instead of the evaluation transform `pre`, e.g. an augmentation of the
    batch whose first image is row `row`. Small images reach it at their own size, large ones already
    resized and center-cropped by `pre` in the workers.
    """
    if split.pixels is not None:
        pin = device.type == "cuda"
        for i in range(start, len(split), batch_size):
            batch = torch.from_numpy(split.pixels[i:i + batch_size])
            if pin:
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
            yield resize_center_crop(batch, pre) if transform is None else transform(batch, i)
        return
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _DecodeResize(split.paths[start:], pre), batch_size=batch_size, num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    row = start
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        yield batch if transform is None else transform(batch, row)
        row += len(batch)
