"""Small fixtures of the named data sets in their real on-disk layouts: the files torchvision expects
after a download, written from images of the bundled sample. Each writer returns what the data set
must then hold: {"classes": first class names, "train": n, "test": n}.

Used by tests/test_datasets.py and benchmarks/suite.py (fixture-sized members of the suite).
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from probe.datasets import SAMPLE_DIR

SAMPLE_CLASSES = sorted(p.name for p in (SAMPLE_DIR / "train").iterdir())


def sample_images(n: int, size: int | None = None, offset: int = 0) -> list[Image.Image]:
    """n real images of the bundled sample (cycling through its classes), resized to size x size."""
    files = sorted((SAMPLE_DIR / "train").glob("*/*.jpg"))
    images = []
    for i in range(n):
        f = files[(offset + i * 37) % len(files)]
        im = Image.open(f).convert("RGB")
        images.append(im.resize((size, size), Image.BILINEAR) if size else im)
    return images


def _save(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        images = sample_images(2, offset=i)
        data = np.stack([np.asarray(im).transpose(2, 0, 1).reshape(-1) for im in images])
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": [i % 3, (i + 1) % 3]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": SAMPLE_CLASSES}))
    return {"classes": SAMPLE_CLASSES[:3], "train": 10, "test": 2}


def cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{i:02d}" for i in range(100)]
    for split, n in (("train", 12), ("test", 6)):
        images = sample_images(n, offset=n)
        data = np.stack([np.asarray(im).transpose(2, 0, 1).reshape(-1) for im in images])
        labels = [i % 3 for i in range(n)]
        (folder / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": names[:20]}))
    return {"classes": names[:3], "train": 12, "test": 6}


def stl10(root: Path) -> dict:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    for split, n in (("train", 10), ("test", 5)):
        images = np.stack([np.asarray(im) for im in sample_images(n, 96, offset=n)])  # [N, H, W, 3]
        # The binary layout: per image, each channel column-major (as torchvision transposes it back).
        images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
        np.array([1 + i % 10 for i in range(n)], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    return {"classes": names[:3], "train": 10, "test": 5}


def svhn(root: Path) -> dict:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 12), ("test", 6)):
        images = np.stack([np.asarray(im) for im in sample_images(n, 32, offset=n)])  # [N, 32, 32, 3]
        labels = np.array([[10 if i % 10 == 0 else i % 10] for i in range(n)], dtype=np.uint8)  # 10 stands for 0
        savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": labels})
    return {"classes": ["0", "1", "2"], "train": 12, "test": 6}


def flowers102(root: Path) -> dict:
    from scipy.io import savemat

    folder = root / "flowers-102"
    n = 12
    for i, im in enumerate(sample_images(n, 48), 1):
        _save(im, folder / "jpg" / f"image_{i:05d}.jpg")
    savemat(folder / "imagelabels.mat", {"labels": np.array([1 + i % 3 for i in range(n)])})
    savemat(folder / "setid.mat", {"trnid": np.arange(1, 5), "valid": np.arange(5, 9), "tstid": np.arange(9, 13)})
    return {"classes": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"], "train": 8, "test": 4}


def dtd(root: Path) -> dict:
    folder = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]
    lists = {s: [] for s in ("train", "val", "test")}
    for i, im in enumerate(sample_images(18, 40)):
        cls = classes[i % 3]
        name = f"{cls}_{i:04d}.jpg"
        _save(im, folder / "images" / cls / name)
        lists[("train", "val", "test")[(i // 3) % 3]].append(f"{cls}/{name}")  # each split: every class
    for split, lines in lists.items():
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        (folder / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return {"classes": classes, "train": len(lists["train"]) + len(lists["val"]), "test": len(lists["test"])}


def oxford_pets(root: Path) -> dict:
    folder = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]
    rows = {"trainval": [], "test": []}
    for i, im in enumerate(sample_images(12, 48)):
        breed, label, species = breeds[i % 3]
        image_id = f"{breed}_{i + 1}"
        _save(im, folder / "images" / f"{image_id}.jpg")
        rows["trainval" if i < 8 else "test"].append(f"{image_id} {label} {species} 1")
    (folder / "annotations").mkdir(parents=True)
    for split, lines in rows.items():
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return {"classes": ["Abyssinian", "American Bulldog", "Bengal"], "train": 8, "test": 4}


def food101(root: Path) -> dict:
    folder = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    meta = {"train": {c: [] for c in classes}, "test": {c: [] for c in classes}}
    for i, im in enumerate(sample_images(12, 48)):
        cls = classes[i % 3]
        _save(im, folder / "images" / cls / f"{1000 + i}.jpg")
        meta["train" if i < 9 else "test"][cls].append(f"{cls}/{1000 + i}")
    (folder / "meta").mkdir(parents=True)
    for split, content in meta.items():
        (folder / "meta" / f"{split}.json").write_text(json.dumps(content))
    return {"classes": classes, "train": 9, "test": 3}


def fgvc_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "727-200", "737-200"]
    rows = {"trainval": [], "test": []}
    for i, im in enumerate(sample_images(12, 48)):
        image_id = f"{1000000 + i:07d}"
        _save(im, data / "images" / f"{image_id}.jpg")
        rows["trainval" if i < 8 else "test"].append(f"{image_id} {variants[i % 3]}")
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, lines in rows.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return {"classes": variants, "train": 8, "test": 4}


def gtsrb(root: Path) -> dict:
    base = root / "gtsrb"
    for i, im in enumerate(sample_images(9, 30)):
        _save(im, base / "GTSRB" / "Training" / f"{i % 3:05d}" / f"00000_{i:05d}.ppm")
    tests = []
    for i, im in enumerate(sample_images(6, 30, offset=5)):
        _save(im, base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm")
        tests.append({"Filename": f"{i:05d}.ppm", "Width": 30, "Height": 30, "Roi.X1": 0, "Roi.Y1": 0, "Roi.X2": 29,
                      "Roi.Y2": 29, "ClassId": i % 3})
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(tests[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(tests)
    return {"classes": ["00000", "00001", "00002"], "train": 9, "test": 6}


def eurosat(root: Path) -> dict:
    classes = ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    for i, im in enumerate(sample_images(15, 64)):
        _save(im, root / "eurosat" / "2750" / classes[i % 3] / f"{classes[i % 3]}_{i}.jpg")
    return {"classes": classes, "train": 12, "test": 3}  # 20% of each class's 5 images: 1


def caltech101(root: Path) -> dict:
    folder = root / "caltech101" / "101_ObjectCategories"
    classes = ["accordion", "airplanes"]
    for c, cls in enumerate(classes):
        for i, im in enumerate(sample_images(33, 40, offset=c), 1):
            _save(im, folder / cls / f"image_{i:04d}.jpg")
    for i, im in enumerate(sample_images(2, 40), 1):  # not a class: torchvision leaves it out
        _save(im, folder / "BACKGROUND_Google" / f"image_{i:04d}.jpg")
    return {"classes": classes, "train": 60, "test": 6}  # 30 of each class train, the other 3 test


def sun397(root: Path) -> dict:
    folder = root / "SUN397"
    classes = [("a", "abbey"), ("a", "apartment_building/outdoor")]
    for c, (letter, name) in enumerate(classes):
        for i, im in enumerate(sample_images(101, 40, offset=c)):
            _save(im, folder / letter / name / f"sun_{c}{i:05d}.jpg")
    (folder / "ClassName.txt").write_text("".join(f"/{letter}/{name}\n" for letter, name in classes))
    return {"classes": [name for _, name in classes], "train": 100, "test": 100}  # 50 + 50 of each


WRITERS = {f.__name__: f for f in (cifar10, cifar100, stl10, svhn, flowers102, dtd, oxford_pets, food101, fgvc_aircraft, gtsrb,
                                    eurosat, caltech101, sun397)}


# Segmentation sets: synthetic scenes (a dark background with bright squares of the classes' colours),
# so that a probe can learn them, written in each published layout.
SEG_COLOURS = [(20, 20, 20), (220, 40, 40), (40, 200, 60), (60, 80, 230)]


def seg_scene(seed: int, size: tuple[int, int] = (40, 48)) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], mask int [H, W] of classes 0..3) with a noisy background and two squares."""
    rng = np.random.default_rng(seed)
    h, w = size
    mask = np.zeros((h, w), np.int64)
    for cls in rng.choice([1, 2, 3], 2, replace=False):
        side = int(rng.integers(h // 3, h // 2))
        top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        mask[top:top + side, left:left + side] = cls
    image = np.array(SEG_COLOURS, np.float64)[mask] + rng.normal(0, 12, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _scenes(n: int, offset: int):
    return [seg_scene(offset + i, (40 + 8 * (i % 2), 48)) for i in range(n)]


def folder_seg(root: Path, n_train: int = 24, n_test: int = 8, ignore: int | None = 255) -> dict:
    """folder-seg:ROOT: {train,test}/images/NAME.jpg with {train,test}/masks/NAME.png; a strip of `ignore`
    (None: none) down the left edge."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        for i, (image, mask) in enumerate(_scenes(n, offset)):
            stored = mask.astype(np.uint8)
            if ignore is not None:
                stored[:, :2] = ignore
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / "images" / f"scene{i:03d}.png")
            Image.fromarray(stored).save(root / split / "masks" / f"scene{i:03d}.png")
    (root / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    return {"classes": ["background", "red", "green", "blue"], "train": n_train, "test": n_test}


def ade20k(root: Path, n_train: int = 6, n_test: int = 4) -> dict:
    """ADEChallengeData2016/: images/{training,validation}/ADE_*.jpg, annotations/.../ADE_*.png (0 = other)."""
    base = root / "ADEChallengeData2016"
    for folder, n, offset, tag in (("training", n_train, 0, "train"), ("validation", n_test, 1000, "val")):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, mask) in enumerate(_scenes(n, offset)):
            name = f"ADE_{tag}_{i + 1:08d}"
            Image.fromarray(image).save(base / "images" / folder / f"{name}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8)).save(base / "annotations" / folder / f"{name}.png")  # 0: other
    return {"classes": ["wall", "building", "sky"], "train": n_train, "test": n_test}


def voc2012_seg(root: Path, n_train: int = 6, n_test: int = 4) -> dict:
    """VOCdevkit/VOC2012/: JPEGImages, SegmentationClass (palette PNGs, 255 = border), ImageSets/Segmentation."""
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    palette = [v for i in range(256) for v in ((i * 40) % 256, (i * 80) % 256, (i * 120) % 256)]
    for split, n, offset in (("train", n_train, 0), ("val", n_test, 1000)):
        names = []
        for i, (image, mask) in enumerate(_scenes(n, offset)):
            name = f"2007_{offset + i:06d}"
            names.append(name)
            Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            stored = mask.astype(np.uint8) * 5  # VOC classes 0, 5, 10, 15
            stored[-1, :] = 255
            png = Image.fromarray(stored, mode="P")
            png.putpalette(palette)
            png.save(base / "SegmentationClass" / f"{name}.png")
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return {"classes": ["background", "aeroplane", "bicycle"], "train": n_train, "test": n_test}


def cityscapes(root: Path, n_train: int = 6, n_test: int = 4) -> dict:
    """cityscapes/: leftImg8bit/{train,val}/CITY/*_leftImg8bit.png, gtFine/.../*_gtFine_labelIds.png."""
    base = root / "cityscapes"
    label_ids = np.array([0, 7, 26, 24])  # unlabeled, road, car, person: train ids 255, 0, 13, 11
    for split, n, offset, city in (("train", n_train, 0, "aachen"), ("val", n_test, 1000, "lindau")):
        (base / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (base / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        for i, (image, mask) in enumerate(_scenes(n, offset)):
            name = f"{city}_{i:06d}_000019"
            Image.fromarray(image).save(base / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            Image.fromarray(label_ids[mask].astype(np.uint8)).save(base / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
            for other in ("color", "instanceIds", "polygons"):  # the files torchvision's class lists beside them
                (base / "gtFine" / split / city / f"{name}_gtFine_{other}.{'json' if other == 'polygons' else 'png'}").touch()
    return {"classes": ["road", "sidewalk", "building"], "train": n_train, "test": n_test}


# ImageNet and its shift sets: a few real WordNet ids, images of the bundled sample.
IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # tench, goldfish, white shark, tiger shark


def _folder_images(folder: Path, n: int, offset: int, ext: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(sample_images(n, 24, offset)):
        im.save(folder / f"{folder.name}_{offset + i}{ext}", format="JPEG" if ext.lower() in (".jpeg", ".jpg") else "PNG")


def imagenet(root: Path, n_train: int = 5, n_val: int = 2, meta: bool = False) -> dict:
    """imagenet/: train/nXXXXXXXX/*.JPEG, val/nXXXXXXXX/*.JPEG (torchvision's layout after it unpacks the archives);
    with meta, torchvision's meta.bin as parse_devkit_archive writes it: (wnid -> class names, val wnids)."""
    base = root / "imagenet"
    for c, wnid in enumerate(IMAGENET_WNIDS):
        _folder_images(base / "train" / wnid, n_train, 10 * c, ".JPEG")
        _folder_images(base / "val" / wnid, n_val, 500 + 10 * c, ".JPEG")
    if meta:
        import torch

        names = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus"),
                 "n01484850": ("great white shark", "white shark"), "n01491361": ("tiger shark", "Galeocerdo cuvieri")}
        torch.save((names, [w for w in IMAGENET_WNIDS for _ in range(n_val)]), base / "meta.bin")
    return {"classes": ["tench", "goldfish", "great white shark"], "train": 4 * n_train, "test": 4 * n_val}


def imagenet_shifts(root: Path, n: int = 2) -> dict:
    """The five shift sets in their published layouts, over the fixture's classes (ImageNet-R and -A: three)."""
    from probe.datasets.imagenet import readable_names, wnids

    order = wnids()
    for c, wnid in enumerate(IMAGENET_WNIDS):
        _folder_images(root / "imagenetv2-matched-frequency-format-val" / str(order.index(wnid)), n, 700 + c, ".jpeg")
        _folder_images(root / "sketch" / wnid, n, 800 + c, ".JPEG")
    for c, wnid in enumerate(IMAGENET_WNIDS[1:]):
        _folder_images(root / "imagenet-r" / wnid, n, 900 + c, ".jpg")
        _folder_images(root / "imagenet-a" / wnid, n, 950 + c, ".jpg")
    base = root / "objectnet-1.0"
    (base / "mappings").mkdir(parents=True, exist_ok=True)
    names = readable_names()
    # The names in another order than the classes' (the devkit's, in the real file), and torchvision's index -> line.
    lines = list(np.random.default_rng(0).permutation(1000))
    (base / "mappings" / "imagenet_to_label_2012_v2").write_text("\n".join(names[order[k]] for k in lines) + "\n")
    (base / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(
        {str(k): lines.index(k) for k in range(1000)}))
    # Two ObjectNet classes: "Fish" maps to two ImageNet classes, "Shark" to two; "Chair" maps to none.
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Fish": f"{names['n01440764']}; {names['n01443537']}", "Shark": f"{names['n01484850']}; {names['n01491361']}"}))
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"fish": "Fish", "shark": "Shark", "chair": "Chair"}))
    for c, folder in enumerate(("fish", "shark", "chair")):
        _folder_images(base / "images" / folder, n, 980 + c, ".png")
    return {"objectnet": {"classes": ["Fish", "Shark"], "groups": [IMAGENET_WNIDS[:2], IMAGENET_WNIDS[2:]]}}
