"""The data set registry: any `--dataset` becomes labelled train and test splits of images.

    cifar10, cifar100                 cifar.py (torchvision's pickled batches)
    stl10, svhn, flowers102, dtd, ... torchvision.py (the standard linear-probe suite)
    sample, folder:PATH               folder.py (the bundled sample; your own image folders)
    imagenet, imagenet_v2, _r, _a,    imagenet.py (ILSVRC2012 and its distribution-shift test sets)
    imagenet_sketch, objectnet
    ade20k, voc2012_seg, cityscapes,  segmentation.py (masks for dense probes on token maps)
    folder-seg:PATH
    hf:NAME-OR-FOLDER[@CONFIG]        hf.py (needs `pip install "probe[hf]"`)
    wds:PATTERN                       wds.py (WebDataset tar shards)
    captions:FILE                     captions.py (Flickr and COCO caption sets, for probe retrieval)

`load_dataset(name, data_dir, download, options)` returns an ImageDataset (probe.datasets.base):
class names, splits, a fingerprint of the images and labels, and the split protocol. Named data sets
live under `data_dir` in torchvision's layout and are downloaded when missing; `describe_datasets()`
is what `probe datasets` prints. Stages never ask which source they hold.
"""

from __future__ import annotations

import os
from pathlib import Path

from functools import partial

from probe.datasets import cifar, folder, imagenet, segmentation, torchvision
from probe.datasets.base import (IMAGE_EXTENSIONS, ImageDataset, ImageFiles, Split, decode_image,
                                 read_image)
from probe.datasets.folder import SAMPLE_DIR
from probe.errors import ProbeError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "ImageFiles", "SAMPLE_DIR", "Split", "check_dataset_name",
           "decode_image", "describe_datasets", "load_dataset", "read_image"]

# name: (loader(data_dir, download), classes, published (train, test) sizes, protocol, where under --data-dir)
NAMED = {
    "cifar10": (lambda root, download: cifar.load("cifar10", root, download), 10, (50000, 10000),
                "official: train, test", "cifar-10-batches-py/"),
    "cifar100": (lambda root, download: cifar.load("cifar100", root, download), 100, (50000, 10000),
                 "official: train, test (the 100 fine labels)", "cifar-100-python/"),
    **{name: (load, classes, sizes, torchvision.PROTOCOLS[name], where)
       for name, (load, classes, sizes, where) in torchvision.DATASETS.items()},
    "ade20k": (segmentation.ade20k, 150, (20210, 2000), segmentation.PROTOCOL + " (SceneParsing)",
               "ADEChallengeData2016/"),
    "voc2012_seg": (segmentation.voc2012_seg, 21, (1464, 1449), segmentation.PROTOCOL, "VOCdevkit/VOC2012/"),
    "cityscapes": (segmentation.cityscapes, 19, (2975, 500), segmentation.PROTOCOL + " (fine)", "cityscapes/"),
    "imagenet": (imagenet.imagenet, 1000, (1281167, 50000), imagenet.PROTOCOL, "imagenet/"),
    **{name: (partial(imagenet.shift, name), classes, (0, size), imagenet.SHIFT_PROTOCOL, folder + "/")
       for name, classes, size in (("imagenet_v2", 1000, 10000), ("imagenet_r", 200, 30000), ("imagenet_a", 200, 7500),
                                   ("imagenet_sketch", 1000, 50000), ("objectnet", 113, None))
       for folder in [imagenet.SHIFTS[name][0]]},
    "sample": (lambda root, download: folder.load_sample(root, download), 10, (1000, 500),
               "bundled with probe: 100 train and 50 test images per class of the JPEG CIFAR-10", "(in the package)"),
}
PREFIXES = ("folder:", "folder-seg:", "hf:", "wds:", "captions:")
# Options that only some sources read; given for another source they are an error, not ignored.
OPTIONS = {"image_column": "hf:", "label_column": "hf:", "test_shards": "wds:", "class_names": "wds:",
           "ignore_index": "folder-seg:"}


def check_dataset_name(name: str) -> None:
    """A one-line error for a --dataset that no source takes, before any data is read."""
    if name not in NAMED and not name.startswith(PREFIXES):
        raise ProbeError(f"unknown data set {name!r}: choose one of {', '.join(NAMED)}, or folder:PATH, "
                         "folder-seg:PATH, hf:NAME-OR-FOLDER[@CONFIG], wds:PATTERN, captions:FILE (probe datasets lists them)")


def load_dataset(name: str, data_dir: str | os.PathLike = "data", download: bool = True,
                 options: dict | None = None) -> ImageDataset:
    """Load a data set by name (`probe datasets` lists them), folder:PATH or hf:NAME-OR-FOLDER[@CONFIG].

    download: fetch a named data set into data_dir when it is missing. options: image_column and
    label_column of a Hugging Face data set; test_shards and class_names of WebDataset shards.
    """
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for option in options:
        if option not in OPTIONS:
            raise ProbeError(f"unknown data set option {option!r}")
        if not name.startswith(OPTIONS[option]):
            raise ProbeError(f"--{option.replace('_', '-')} is for --dataset {OPTIONS[option]}..., not {name}")
    if name in NAMED:
        data = NAMED[name][0](Path(data_dir), download)
        data.protocol = NAMED[name][3]
        return data
    if name.startswith("folder-seg:"):
        return segmentation.folder_seg(name[len("folder-seg:"):], Path(data_dir), download, options)
    if name.startswith("folder:"):
        return folder.load(name[len("folder:"):], Path(data_dir), download, options)
    if name.startswith("hf:"):
        from probe.datasets import hf

        return hf.load(name[len("hf:"):], Path(data_dir), download, options)
    if name.startswith("wds:"):
        from probe.datasets import wds

        return wds.load(name[len("wds:"):], Path(data_dir), download, options)
    if name.startswith("captions:"):
        from probe.datasets import captions

        return captions.load(name[len("captions:"):], Path(data_dir), download, options)
    raise ProbeError(f"unknown data set {name!r}: choose one of {', '.join(NAMED)}, or folder:PATH, "
                     "hf:NAME-OR-FOLDER[@CONFIG], wds:PATTERN, captions:FILE (probe datasets lists them)")


def describe_datasets(data_dir: str | os.PathLike = "data") -> list[dict]:
    """One row per named data set, for `probe datasets`: classes, published split sizes, protocol, and
    whether it is already under data_dir."""
    rows = []
    for name, (_, classes, (n_train, n_test), protocol, where) in NAMED.items():
        first = where.split(",")[0].strip()
        present = name == "sample" or (Path(data_dir) / first).exists()
        rows.append({"dataset": name, "classes": classes, "train": n_train, "test": n_test, "protocol": protocol,
                     "layout": where, "present": present})
    return rows
