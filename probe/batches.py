"""Images to float batches on the device: the one preprocessing path of extraction, fine-tuning and
prediction, and the augmented views.

Small images (CIFAR-sized) are decoded once into one uint8 array and resized on the device in
batches; large images, and any data set too big to hold decoded, are decoded and resized in
DataLoader workers. Both paths use `resize_center_crop`, and so does `probe predict`, so an image gets
the same pixels whichever way it reaches the backbone.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from probe.datasets import Split
from probe.errors import ProbeError
from probe.preprocess import Preprocess, resize_center_crop

# Images at most this many pixels on a side are decoded up front into one array, when all of them
# together take at most SMALL_IMAGES_BYTES (ImageNet downsampled to 64 px would not: 15 GB).
SMALL_IMAGE_SIDE = 64
SMALL_IMAGES_BYTES = 2 << 30


def decode_small(split: Split) -> Split:
    """Decode a split of small images, all of one size, into one uint8 array; leave anything else as it is."""
    if split.pixels is not None:
        return split
    first = split.read(0)
    if max(first.shape[:2]) > SMALL_IMAGE_SIDE or len(split) * first.nbytes > SMALL_IMAGES_BYTES:
        return split
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL releases the GIL while decoding
        images = list(pool.map(split.read, range(len(split)), chunksize=256))
    if any(im.shape != first.shape for im in images):
        return split
    return Split(labels=split.labels, pixels=np.stack(images), images=split.images)


AUGMENTATIONS = ("rrc", "crop", "flip", "none")
RRC_SCALE, RRC_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)
CROP_PADDING = 4
# What each augmentation is, as data: it goes into the identity of a views cache and of a fine-tune,
# so a change of recipe (revision) can never reuse features or checkpoints of the old one.
RECIPES = {
    "rrc": "torchvision RandomResizedCrop(scale=(0.6, 1), ratio=(3/4, 4/3), bilinear, antialias) + RandomHorizontalFlip",
    "crop": "torchvision RandomCrop(padding=4, fill=0) + RandomHorizontalFlip, then Resize (bilinear, antialias)",
    "flip": "torchvision RandomHorizontalFlip, then Resize (bilinear, antialias)",
    "none": "the evaluation transform",
}


def recipe(kind: str) -> dict:
    """The augmentation `kind` as data, for identities."""
    if kind not in RECIPES:
        raise ProbeError(f"unknown augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return {"kind": kind, "recipe": RECIPES[kind], "revision": 2}


def draw_box(kind: str, height: int, width: int, rng: torch.Generator) -> tuple[int, int, int, int, bool]:
    """(top, left, box height, box width, flip) of one image, drawn from `rng` exactly as torchvision's
    RandomResizedCrop.get_params (ten tries, then the central crop) or RandomCrop.get_params (on the
    image padded by 4) draw them from the global generator, then RandomHorizontalFlip's coin."""
    if kind == "rrc":
        box = None
        log_ratio = torch.log(torch.tensor(RRC_RATIO))
        for _ in range(10):
            area = height * width * torch.empty(1).uniform_(*RRC_SCALE, generator=rng).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=rng).item())
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=rng).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=rng).item())
                box = (top, left, h, w)
                break
        if box is None:  # torchvision's fallback: the central crop, its aspect ratio clamped into range
            ratio = width / height
            w, h = (width, int(round(width / RRC_RATIO[0]))) if ratio < RRC_RATIO[0] else \
                (int(round(height * RRC_RATIO[1])), height) if ratio > RRC_RATIO[1] else (width, height)
            box = ((height - h) // 2, (width - w) // 2, h, w)
    elif kind == "crop":  # a window of the image's own size in the image padded by CROP_PADDING
        top = int(torch.randint(0, 2 * CROP_PADDING + 1, size=(1,), generator=rng).item())
        left = int(torch.randint(0, 2 * CROP_PADDING + 1, size=(1,), generator=rng).item())
        box = (top - CROP_PADDING, left - CROP_PADDING, height, width)  # in the unpadded image's coordinates
    elif kind == "flip":
        box = (0, 0, height, width)
    else:
        raise ProbeError(f"unknown augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return (*box, bool(torch.rand(1, generator=rng).item() < 0.5))


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int, bool], size: int) -> torch.Tensor:
    """One image [3, H, W] cropped to `box` (outside the image: zeros, as RandomCrop's padding), flipped if
    the box says so, and resized to size x size as torchvision's resized_crop resizes (bilinear, antialias)."""
    top, left, h, w, flip = box
    height, width = image.shape[-2:]
    if top < 0 or left < 0 or top + h > height or left + w > width:
        pad = max(-top, -left, top + h - height, left + w - width)
        image = F.pad(image, (pad, pad, pad, pad))
        top, left = top + pad, left + pad
    crop = image[:, top:top + h, left:left + w]
    if flip:
        crop = crop.flip(-1)
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def augment(images: torch.Tensor, pre: Preprocess, kind: str, rng) -> torch.Tensor:
    """Random crops and flips of a float batch [B, 3, H, W], each resized to pre.size x pre.size.

    rng: one torch.Generator per image (a view is then a function of its own generator alone,
    whatever the batch), or one generator that the images draw from in turn. rrc: torchvision's
    RandomResizedCrop(scale 0.6-1, ratio 3/4-4/3) + flip; crop: RandomCrop(H, padding 4) + flip, then
    the resize (the CIFAR recipe); flip: the flip alone; none: the evaluation transform `pre`.
    """
    if kind == "none":
        return resize_center_crop(images, pre)
    generators = rng if isinstance(rng, (list, tuple)) else [rng] * len(images)
    h, w = images.shape[-2:]
    return torch.stack([crop_resize(image, draw_box(kind, h, w, g), pre.size) for image, g in zip(images, generators)])


def center_square(images: torch.Tensor) -> torch.Tensor:
    """The central square of images [..., H, W], of side min(H, W)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top:top + side, left:left + side]


class _DecodeResize(torch.utils.data.Dataset):
    """Worker-side path for large images: decode, then the evaluation transform's resize and crop."""

    def __init__(self, split: Split, start: int, stop: int, pre: Preprocess):
        self.split, self.start, self.stop, self.pre = split, start, stop, pre

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        image = torch.from_numpy(self.split.read(self.start + i)).permute(2, 0, 1)[None].float()
        return resize_center_crop(image, self.pre)[0]


def iter_batches(split: Split, pre: Preprocess, batch_size: int, device: torch.device, start: int = 0,
                 num_workers: int | None = None, transform=None, stop: int | None = None):
    """Yield float image batches [B, 3, pre.size, pre.size] in [0, 255] on `device`, rows start..stop-1.

    transform(images, row): instead of the evaluation transform `pre`, e.g. an augmentation of the
    batch whose first image is row `row`. Small images reach it at their own size, large ones already
    resized and center-cropped by `pre` in the workers.
    """
    stop = len(split) if stop is None else stop
    if split.pixels is not None:
        pin = device.type == "cuda"
        for i in range(start, stop, batch_size):
            batch = torch.from_numpy(split.pixels[i:min(i + batch_size, stop)])
            if pin:
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
            yield resize_center_crop(batch, pre) if transform is None else transform(batch, i)
        return
    # Ranks on one machine share its cores (LOCAL_WORLD_SIZE: torchrun's processes per node).
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = min(8, max(1, cores)) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _DecodeResize(split, start, stop, pre), batch_size=batch_size, num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    row = start
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        yield batch if transform is None else transform(batch, row)
        row += len(batch)
