"""ImageNet-1k (ILSVRC2012) and its distribution-shift test sets, in their published layouts under --data-dir.

    imagenet          imagenet/: train/nXXXXXXXX/*.JPEG and val/nXXXXXXXX/*.JPEG. With torchvision's meta.bin
                      or the devkit (ILSVRC2012_devkit_t12.tar.gz) beside them, torchvision's ImageNet class
                      reads them (and unpacks ILSVRC2012_img_{train,val}.tar there first, as it does);
                      without, the folder layout alone, with the WordNet ids' names from timm's table.
                      Protocol: train (1,281,167), val (50,000) as the test split.
    imagenet_v2       imagenetv2-matched-frequency-format-val/{0..999}/*.jpeg: folder = ImageNet class index
    imagenet_r        imagenet-r/nXXXXXXXX/*.jpg: 200 classes
    imagenet_a        imagenet-a/nXXXXXXXX/*.jpg: 200 classes
    imagenet_sketch   sketch/nXXXXXXXX/*.JPEG (ImageNet-Sketch's archive): 1000 classes
    objectnet         objectnet-1.0/images/FOLDER/*.png with objectnet-1.0/mappings/*.json: its 113 classes
                      that map to ImageNet classes, by ObjectNet's own mapping files

The shift sets are test-only. Each of their classes is a group of ImageNet classes (WordNet ids; one
for all but ObjectNet's, whose classes map to one or more), stored in the cache, so that an ImageNet
head scores them (probe.shift): its probabilities restricted to the ImageNet classes the set covers
before the argmax, the prediction counted right when it falls in the true class's group.

The class order is torchvision's (sorted WordNet ids, as `ImageFolder` and the hub's imagenet-1k);
the 1000 ids and their names are timm's tables (timm.data.ImageNetInfo), which match it.
"""

from __future__ import annotations

import json
from pathlib import Path

from probe.datasets.base import ImageDataset, ImageFiles, file_splits, image_files, relative_place
from probe.errors import ProbeError

PROTOCOL = "official: train (1,281,167), val (50,000) as the test split"
SHIFT_PROTOCOL = "test-only: scored with an ImageNet head, its logits restricted to the set's classes"
# name: (folder under --data-dir, what it is, the README's words on where to get it)
SHIFTS = {
    "imagenet_v2": ("imagenetv2-matched-frequency-format-val", "ImageNet-V2 matched frequency",
                    "imagenetv2-matched-frequency.tar.gz of github.com/modestyachts/ImageNetV2"),
    "imagenet_r": ("imagenet-r", "ImageNet-R", "imagenet-r.tar of github.com/hendrycks/imagenet-r"),
    "imagenet_a": ("imagenet-a", "ImageNet-A", "imagenet-a.tar of github.com/hendrycks/natural-adv-examples"),
    "imagenet_sketch": ("sketch", "ImageNet-Sketch", "ImageNet-Sketch.zip of github.com/HaohanWang/ImageNet-Sketch"),
    "objectnet": ("objectnet-1.0", "ObjectNet", "objectnet-1.0.zip of objectnet.dev"),
}


def wnids() -> list[str]:
    """The 1000 WordNet ids in ImageNet-1k's class order."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def readable_names() -> dict[str, str]:
    """WordNet id -> the first of its names ("n01440764" -> "tench"), as torchvision's ImageNet lists them."""
    from timm.data import ImageNetInfo

    return {w: d.split(",")[0].strip() for w, d in ImageNetInfo("imagenet-1k").label_descriptions(as_dict=True).items()}


def imagenet(data_dir: Path, download: bool) -> ImageDataset:
    root = data_dir / "imagenet"
    archives = [root / n for n in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")]
    devkit = root / "ILSVRC2012_devkit_t12.tar.gz"
    if (root / "meta.bin").is_file() or devkit.is_file() or all(a.is_file() for a in archives):
        return _torchvision_imagenet(root)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise ProbeError(f"ImageNet is not in {root}/ and cannot be downloaded (its licence gives the archives to each "
                         "user): put ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz "
                         f"there (torchvision unpacks them), or train/ and val/ folders of nXXXXXXXX class folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    unknown = [c for c in classes if c not in set(wnids())]
    if unknown:
        raise ProbeError(f"{root / 'train'} holds folder {unknown[0]!r}, which is not an ImageNet-1k WordNet id")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, folder in (("train", "train"), ("test", "val")):
        present = sorted(p.name for p in (root / folder).iterdir() if p.is_dir())
        if [c for c in present if c not in index]:
            raise ProbeError(f"{root / folder} holds class folders that train/ does not: "
                             f"{', '.join(c for c in present if c not in index)[:200]}")
        files = [(f, index[c]) for c in present for f in image_files(root / folder / c)]
        splits[split] = ([str(f) for f, _ in files], [lab for _, lab in files])
    built, fingerprint = file_splits(splits, relative_place(root))
    names = readable_names()
    return ImageDataset("imagenet", [names[c] for c in classes], built, fingerprint, PROTOCOL, wnids=classes)


def _torchvision_imagenet(root: Path) -> ImageDataset:
    """torchvision's own reader: its meta.bin (made from the devkit) names the classes."""
    import torchvision.datasets as tvd

    try:
        parts = {split: tvd.ImageNet(str(root), split=folder) for split, folder in (("train", "train"), ("test", "val"))}
    except (RuntimeError, OSError, ValueError) as e:
        raise ProbeError(f"torchvision cannot read ImageNet in {root}/ ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    train = parts["train"]
    splits = {s: ([p for p, _ in d.samples], [lab for _, lab in d.samples]) for s, d in parts.items()}
    built, fingerprint = file_splits(splits, relative_place(root))
    return ImageDataset("imagenet", [names[0] for names in train.classes], built, fingerprint, PROTOCOL,
                        wnids=list(train.wnids))


def shift(name: str, data_dir: Path, download: bool) -> ImageDataset:
    folder, what, source = SHIFTS[name]
    root = data_dir / folder
    if not root.is_dir():
        raise ProbeError(f"{what} is not in {root}/: download {source} and unpack it in {data_dir}/ (probe does not "
                         "download it)")
    if name == "objectnet":
        return _objectnet(root)
    all_wnids, names = wnids(), readable_names()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if name == "imagenet_v2":  # class folders are ImageNet class indices
        bad = [f for f in folders if not (f.isdigit() and int(f) < 1000)]
        if bad:
            raise ProbeError(f"{root} holds folder {bad[0]!r}: ImageNet-V2's folders are class indices 0..999")
        folders = sorted(folders, key=int)
        groups = [[all_wnids[int(f)]] for f in folders]
    else:
        bad = [f for f in folders if f not in set(all_wnids)]
        if bad:
            raise ProbeError(f"{root} holds folder {bad[0]!r}, which is not an ImageNet-1k WordNet id")
        groups = [[f] for f in folders]
    files = [(f, i) for i, d in enumerate(folders) for f in image_files(root / d)]
    built, fingerprint = file_splits({"test": ([str(f) for f, _ in files], [lab for _, lab in files])},
                                     relative_place(root))
    return ImageDataset(name, [names[g[0]] for g in groups], built, fingerprint, SHIFT_PROTOCOL, groups=groups)


def _objectnet(root: Path) -> ImageDataset:
    """ObjectNet's images of its classes that map to ImageNet, by its mappings/ files, read as ObjectNet's
    own code and wise-ft's read them: folder -> ObjectNet label (folder_to_objectnet_label.json), ObjectNet
    label -> ImageNet names joined by '; ' (objectnet_to_imagenet_1k.json), the ImageNet names one per line
    (imagenet_to_label_2012_v2, in the devkit's order) and torchvision's class index -> that line
    (pytorch_to_imagenet_2012_id.json). Images lose their 2-pixel border, as ObjectNet's code crops it."""
    maps = root / "mappings"
    try:
        folder_label = json.loads((maps / "folder_to_objectnet_label.json").read_text())
        to_imagenet = json.loads((maps / "objectnet_to_imagenet_1k.json").read_text())
        lines = [line.strip() for line in (maps / "imagenet_to_label_2012_v2").read_text().splitlines()]
        line_of = {int(k): int(v) for k, v in json.loads((maps / "pytorch_to_imagenet_2012_id.json").read_text()).items()}
    except (OSError, ValueError) as e:
        raise ProbeError(f"ObjectNet's mapping files in {maps} are missing or unreadable ({type(e).__name__}); "
                         "objectnet-1.0.zip has them") from None
    if sorted(line_of) != list(range(1000)) or sorted(line_of.values()) != list(range(1000)) or len(lines) < 1000:
        raise ProbeError(f"{maps}: pytorch_to_imagenet_2012_id.json and imagenet_to_label_2012_v2 do not map ImageNet's "
                         "1000 classes one to one")
    index, all_wnids = {lines[line]: k for k, line in line_of.items()}, wnids()
    labels, groups = [], []
    for label in sorted(to_imagenet):
        members = [n.strip() for n in to_imagenet[label].split(";")]
        missing = [n for n in members if n not in index]
        if missing:
            raise ProbeError(f"objectnet_to_imagenet_1k.json maps {label!r} to {missing[0]!r}, which "
                             "imagenet_to_label_2012_v2 does not list")
        labels.append(label)
        groups.append(sorted(all_wnids[index[n]] for n in members))
    of_label = {label: i for i, label in enumerate(labels)}
    files = [(f, of_label[folder_label[d.name]]) for d in sorted((root / "images").iterdir())
             if d.is_dir() and folder_label.get(d.name) in of_label for f in image_files(d)]
    if not files:
        raise ProbeError(f"no images of ObjectNet's ImageNet-mapped classes under {root / 'images'}")
    built, fingerprint = file_splits({"test": ([str(f) for f, _ in files], [lab for _, lab in files])},
                                     relative_place(root))
    built["test"].images = BorderCropped(built["test"].images.paths)
    return ImageDataset("objectnet", labels, built, fingerprint, SHIFT_PROTOCOL + " (the 113 ObjectNet classes that map "
                        "to ImageNet, a class's score its ImageNet classes' best; the 2-pixel border cropped)", groups=groups)


class BorderCropped(ImageFiles):
    """ObjectNet's images without their 2-pixel (red) border, as its own data loader crops (2, 2, w - 2, h - 2)."""

    def read(self, i: int):
        return super().read(i)[2:-2, 2:-2]

    def subset(self, rows) -> "BorderCropped":
        return BorderCropped([self.paths[i] for i in rows])

