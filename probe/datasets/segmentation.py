"""Semantic segmentation data sets in their published layouts, for dense probes on token maps.

    ade20k          ADEChallengeData2016/ (SceneParsing): images/{training,validation}/*.jpg and
                    annotations/{training,validation}/*.png; 150 classes, value 0 ("other") ignored,
                    v -> class v - 1 (the benchmark's rule, mmsegmentation's reduce_zero_label)
    voc2012_seg     VOCdevkit/VOC2012/ (torchvision's VOCSegmentation reads it): JPEGImages,
                    SegmentationClass, ImageSets/Segmentation/{train,val}.txt; 21 classes, 255 ignored
    cityscapes      leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png
                    (torchvision's Cityscapes reads them); the 19 training classes by torchvision's
                    table of label ids to train ids, the others ignored
    folder-seg:PATH PATH/{train,test}/images/NAME.* with PATH/{train,test}/masks/NAME.png, mask values
                    the class indices (PATH/classes.txt names them, one per line), 255 ignored

The official validation split is the test split (the test sets' masks are not published). A mask is
read as a class index per pixel, -1 where ignored (`MaskFiles`); `write_masks` stores them in the
cache at token resolution (each grid cell's most frequent class, for training) and, for the test
split, at the image's own resolution (for scoring).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from probe.datasets.base import ImageDataset, ImageFiles, Split, files_fingerprint, image_files
from probe.errors import ProbeError

IGNORE = -1  # the class index of an ignored pixel, in every cache
NOT_A_CLASS = -2  # a table's entry for a stored value that is neither a class nor ignored: refused on reading
PROTOCOL = "official: train, val as the test split"
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"


class MaskFiles:
    """Mask PNGs, each read as int16 class indices [H, W] (IGNORE where ignored) through `table`, the
    class index of each stored value 0..255; a value the table calls NOT_A_CLASS is refused."""

    def __init__(self, paths, table: np.ndarray):
        self.paths, self.table = [str(p) for p in paths], table

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        try:
            with Image.open(self.paths[i]) as im:
                values = np.array(im)  # palette PNGs (VOC) give their indices, not colours
        except (OSError, ValueError) as e:
            raise ProbeError(f"cannot read mask {self.paths[i]}: {e}; delete or replace that file") from None
        if values.ndim != 2 or values.dtype != np.uint8:
            raise ProbeError(f"mask {self.paths[i]} is not a single-channel 8-bit PNG ({values.dtype}, "
                             f"{values.shape}); save masks as class indices, 0..255")
        classes = self.table[values]
        if (classes == NOT_A_CLASS).any():
            bad = int(values[classes == NOT_A_CLASS][0])
            raise ProbeError(f"mask {self.paths[i]} holds value {bad}, which is neither one of the "
                             f"{int(self.table.max()) + 1} classes nor the ignored value")
        return classes


def table(n_classes: int, mapping: dict[int, int] | None = None, shift: int = 0,
          ignore: tuple[int, ...] = (255,)) -> np.ndarray:
    """A value -> class table: value - shift (mapping where given, every other value ignored), IGNORE for
    `ignore` values, NOT_A_CLASS for a value past the n_classes classes."""
    t = np.arange(256, dtype=np.int16) - shift
    t[t >= n_classes] = NOT_A_CLASS
    if mapping is not None:
        t = np.full(256, IGNORE, np.int16)
        for value, cls in mapping.items():
            t[value] = cls
    for value in ignore:
        t[value] = IGNORE
    return t


def _dataset(name: str, root: Path, classes: list[str], pairs: dict[str, tuple[list, list]], lut: np.ndarray,
             protocol: str = PROTOCOL) -> ImageDataset:
    """A segmentation data set from {split: (image paths, mask paths)}: images, masks, one fingerprint of both."""
    for split, (images, masks) in pairs.items():
        if not images:
            raise ProbeError(f"{name}: no {split} images under {root}")
        missing = [m for m in masks if not Path(m).is_file()]
        if missing:
            raise ProbeError(f"{name}: {len(missing)} {split} image(s) without a mask, such as {missing[0]}")
    places = [(f"{split}/{kind}/{Path(p).name}", p) for split, (images, masks) in pairs.items()
              for kind, paths in (("image", images), ("mask", masks)) for p in paths]
    # The value -> class table is part of what the masks mean: another rule, another fingerprint.
    fingerprint = hashlib.sha256(files_fingerprint(places).encode() + lut.tobytes()).hexdigest()[:16]
    splits = {split: Split(np.zeros(len(images), np.int64), images=ImageFiles(images)) for split, (images, _) in pairs.items()}
    return ImageDataset(name, classes, splits, fingerprint, protocol,
                        masks={split: MaskFiles(masks, lut) for split, (_, masks) in pairs.items()})


def ade20k(data_dir: Path, download: bool) -> ImageDataset:
    root = data_dir / "ADEChallengeData2016"
    if not (root / "images").is_dir():
        _download(root, download, "ADE20K (SceneParsing)", ADE_URL)
    pairs = {}
    for split, folder in (("train", "training"), ("test", "validation")):
        images = sorted(p for p in (root / "images" / folder).glob("*.jpg"))
        pairs[split] = ([str(p) for p in images], [str(root / "annotations" / folder / f"{p.stem}.png") for p in images])
    classes = json.loads((Path(__file__).parent / "ade20k_classes.json").read_text())
    return _dataset("ade20k", root, classes, pairs, table(len(classes), shift=1, ignore=(0,)))


def voc2012_seg(data_dir: Path, download: bool) -> ImageDataset:
    from probe.datasets.torchvision import _tv

    parts = {split: _tv("VOCSegmentation", data_dir, download, year="2012", image_set=image_set)
             for split, image_set in (("train", "train"), ("test", "val"))}
    classes = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    pairs = {split: (list(p.images), list(p.masks)) for split, p in parts.items()}
    return _dataset("voc2012_seg", data_dir / "VOCdevkit" / "VOC2012", classes, pairs, table(len(classes)))


def cityscapes(data_dir: Path, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    root = data_dir / "cityscapes"
    if not (root / "leftImg8bit").is_dir():
        raise ProbeError(f"Cityscapes is not in {root}/: its download needs an account at cityscapes-dataset.com; "
                         "unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip there")
    parts = {split: tvd.Cityscapes(str(root), split=folder, mode="fine", target_type="semantic")
             for split, folder in (("train", "train"), ("test", "val"))}
    train_classes = sorted({c.train_id for c in tvd.Cityscapes.classes if 0 <= c.train_id < 255})
    classes = [next(c.name for c in tvd.Cityscapes.classes if c.train_id == t) for t in train_classes]
    mapping = {c.id: c.train_id for c in tvd.Cityscapes.classes if 0 <= c.id < 256 and 0 <= c.train_id < 255}
    pairs = {split: (list(p.images), [t[0] for t in p.targets]) for split, p in parts.items()}
    return _dataset("cityscapes", root, classes, pairs, table(len(classes), mapping))


def folder_seg(path: str, data_dir: Path, download: bool, options: dict) -> ImageDataset:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ProbeError(f"folder-seg:{path}: no folder {root}")
    pairs = {}
    for split in ("train", "test"):
        images = image_files(root / split / "images")
        if split == "train" or images:
            pairs[split] = ([str(p) for p in images], [str(root / split / "masks" / f"{p.stem}.png") for p in images])
    if "test" not in pairs:
        raise ProbeError(f"folder-seg:{path}: no images in test/images/ (a segmentation set needs its own test split)")
    ignore = int(options.get("ignore_index", 255))
    if not 0 <= ignore <= 255:
        raise ProbeError(f"--ignore-index {ignore}: give a mask value 0..255")
    names = root / "classes.txt"
    if names.is_file():
        classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
    else:  # the values the masks hold, 0..max
        top = max(int(MaskFiles(masks, table(256, ignore=(ignore,))).read(i).max())
                  for _, masks in pairs.values() for i in range(len(masks)))
        classes = [str(i) for i in range(top + 1)]
    return _dataset(f"folder-seg:{root}", root, classes, pairs, table(len(classes), ignore=(ignore,)))


def check_masks(data: ImageDataset) -> None:
    """Read every mask once before a backbone pass: each a class index map (no value past the classes) of
    its image's size (from the image file's header). A mask that would fail at the end of the pass fails
    now, with nothing written."""
    for split, masks in data.masks.items():
        images = data.splits[split].images
        for i in range(len(masks)):
            mask = masks.read(i)
            try:
                with Image.open(images.name(i)) as im:  # the header only: its size
                    width, height = im.size
            except OSError as e:
                raise ProbeError(f"cannot read image {images.name(i)}: {e}; delete or replace that file") from None
            if (height, width) != mask.shape:
                raise ProbeError(f"mask {masks.paths[i]} is {mask.shape[1]}x{mask.shape[0]}, its image "
                                 f"{width}x{height}: a mask must match its image")


def _download(root: Path, download: bool, what: str, url: str) -> None:
    from probe.datasets.base import cleanup_on_failure
    from probe.datasets.torchvision import _download_error

    if not download:
        raise ProbeError(f"{what} is not in {root}/ in its published layout; run probe extract (it downloads it)")
    from torchvision.datasets.utils import download_and_extract_archive

    with cleanup_on_failure(root.parent):
        try:
            download_and_extract_archive(url, str(root.parent))
        except Exception as e:  # network errors, a damaged archive
            raise _download_error(what, root.parent, e) from None


def cell_labels(mask: np.ndarray, side: int, n_classes: int) -> np.ndarray:
    """The most frequent class of each cell of a side x side grid over the mask (the token grid over the
    squashed image), IGNORE where a cell has no labelled pixel: [side * side] int16."""
    h, w = mask.shape
    cell = (np.arange(h) * side // h)[:, None] * side + (np.arange(w) * side // w)[None, :]
    valid = mask >= 0
    counts = np.bincount(cell[valid] * n_classes + mask[valid], minlength=side * side * n_classes)
    counts = counts.reshape(side * side, n_classes)
    return np.where(counts.sum(1) > 0, counts.argmax(1), IGNORE).astype(np.int16)


def write_masks(data: ImageDataset, token_shape: tuple[int, int, int], f) -> None:
    """The masks of a segmentation set into an open cache file: {split}/masks [N, G * G] at token
    resolution, and test/full_masks (each image's mask at its own size, flattened, int16) with
    test/mask_shapes [N, 2]."""
    import h5py

    side, n = token_shape[0], len(data.classes)
    for split, masks in data.masks.items():
        cells = f.create_dataset(f"{split}/masks", shape=(len(masks), side * side), dtype=np.int16)
        if split == "test":
            full = f.create_dataset("test/full_masks", shape=(len(masks),), dtype=h5py.vlen_dtype(np.int16))
            shapes = f.create_dataset("test/mask_shapes", shape=(len(masks), 2), dtype=np.int64)
        for i in range(len(masks)):  # check_masks has read each before the pass
            mask = masks.read(i)
            cells[i] = cell_labels(mask, side, n)
            if split == "test":
                full[i], shapes[i] = mask.ravel(), mask.shape
    f.attrs.update({"task": "segmentation", "ignore_index": IGNORE})


def write_extras(data: ImageDataset, token_shape: tuple[int, int, int] | None, f) -> None:
    """What a data set adds to its cache file (open h5py file): a segmentation set's masks, ImageNet's WordNet
    ids, a shift set's class groups (probe.shift reads the last two)."""
    if data.masks is not None:
        write_masks(data, token_shape, f)
    if data.wnids:
        f.attrs["wnids"] = json.dumps(data.wnids)
    if data.groups:
        f.attrs["groups"] = json.dumps(data.groups)
