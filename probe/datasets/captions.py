"""Caption data sets for image-text retrieval (`captions:ANNOTATIONS`), in the layouts CLIP_benchmark
reads them in:

- Flickr30k / Flickr8k: a CSV text file (CLIP_benchmark's `flickr30k_test_karpathy.txt`: a header line,
  then `IMAGE.jpg,caption` lines, several per image), images beside it.
- MSCOCO captions: a COCO captions JSON (`coco_test_karpathy.json`, `captions_val2014.json`: `images` with
  `id` and `file_name`, `annotations` with `image_id` and `caption`), images beside it or in one of its
  subfolders (`val2014/`).

Images come in the order CLIP_benchmark's readers give them (Flickr: first appearance in the file;
COCO: by image id, as torchvision's CocoCaptions), each with its captions in file order. Every image
is its own "class" (label = its index), all in one split (stored as the cache's "train", the split
every cache has): a caption set is for `probe retrieval`, not for fitting a head. The fingerprint
covers the annotation file and every image.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from probe.datasets.base import ImageDataset, file_splits
from probe.errors import ProbeError


CAPTIONS = "a caption set: every image of the caption file in one split, for probe retrieval"


def read_annotations(path: Path) -> list[tuple[str, list[str]]]:
    """[(image file name, [captions])] of a Flickr CSV or COCO captions JSON file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"cannot read caption file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix.lower() == ".json":
        try:
            coco = json.loads(text)
            names = {image["id"]: image["file_name"] for image in coco["images"]}
            captions = defaultdict(list)
            for a in coco["annotations"]:
                captions[a["image_id"]].append(a["caption"])
        except (ValueError, KeyError, TypeError) as e:
            raise ProbeError(f"{path} is not a COCO captions file (images with id and file_name, annotations "
                             f"with image_id and caption): {type(e).__name__}: {e}") from None
        orphans = sorted(set(captions) - set(names), key=str)
        if orphans:
            raise ProbeError(f"{path}: captions of image id {orphans[0]!r} ({len(orphans)} id(s) in all), which is not "
                             "among its images")
        pairs = [(names[i], captions[i]) for i in sorted(names)]
    else:
        pairs = _flickr(path, text)
    for name, found in pairs:  # every image a query of text retrieval, every caption a string
        if not found:
            raise ProbeError(f"{path}: image {name} has no caption (as a query of image-to-text retrieval it could "
                             "only miss); remove it or add its captions")
        bad = next((c for c in found if not isinstance(c, str) or not c.strip()), None)
        if bad is not None:
            raise ProbeError(f"{path}: a caption of image {name} is {bad!r}, not text")
    return pairs


def _flickr(path: Path, text: str) -> list[tuple[str, list[str]]]:
    captions = defaultdict(list)
    for number, line in enumerate(text.splitlines()[1:], start=2):  # the first line is the header
        line = line.strip()
        if not line:
            continue
        image, sep, caption = line.partition(".jpg,")
        if not sep:
            raise ProbeError(f"{path}:{number} is not an IMAGE.jpg,caption line (the Flickr caption layout)")
        captions[image + ".jpg"].append(caption)
    return list(captions.items())


def _find(root: Path, name: str) -> Path:
    if (root / name).is_file():
        return root / name
    for sub in sorted(d for d in root.iterdir() if d.is_dir()):
        if (sub / name).is_file():
            return sub / name
    raise ProbeError(f"caption file names image {name}, which is not in {root} or a folder inside it")


def load(spec: str, data_dir: Path, download: bool, options: dict) -> ImageDataset:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ProbeError(f"caption file {path} not found: give captions:FILE, a Flickr CSV (flickr30k_test_karpathy.txt) "
                         "or a COCO captions JSON (coco_test_karpathy.json), the images beside it")
    pairs = read_annotations(path)
    if not pairs:
        raise ProbeError(f"caption file {path} names no images")
    files = [_find(path.parent, name) for name, _ in pairs]
    splits, images = file_splits({"train": (files, list(range(len(files))))},
                                 lambda split, f, label: f"{split}/{label}/{Path(f).relative_to(path.parent)}")
    digest = hashlib.sha256(images.encode() + path.read_bytes()).hexdigest()[:16]  # the captions too
    return ImageDataset(f"captions:{path}", [name for name, _ in pairs], splits, digest, CAPTIONS,
                        captions=[captions for _, captions in pairs])
