"""The training augmentations, as torchvision defines them: RandomResizedCrop, RandomCrop with padding,
RandomHorizontalFlip. The boxes are drawn exactly as torchvision draws them, from a generator given per
image (a view of the cache is then a function of its image's generator alone), and each crop is resized
as torchvision's resized_crop resizes. `recipe()` is the augmentation as data, for identities; it and
the names need no torch.
"""

from __future__ import annotations

import math

from probe.errors import ProbeError
from probe.preprocess import Preprocess, resize_center_crop

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


def draw_box(kind: str, height: int, width: int, rng) -> tuple[int, int, int, int, bool]:
    """(top, left, box height, box width, flip) of one image, drawn from `rng` exactly as torchvision's
    RandomResizedCrop.get_params (ten tries, then the central crop) or RandomCrop.get_params (on the
    image padded by 4) draw them from the global generator, then RandomHorizontalFlip's coin."""
    import torch

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


def crop_resize(image, box: tuple[int, int, int, int, bool], size: int):
    """One image [3, H, W] cropped to `box` (outside the image: zeros, as RandomCrop's padding), flipped if
    the box says so, and resized to size x size as torchvision's resized_crop resizes (bilinear, antialias)."""
    import torch.nn.functional as F

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


def augment(images, pre: Preprocess, kind: str, rng):
    """Random crops and flips of a float batch [B, 3, H, W], each resized to pre.size x pre.size.

    rng: one torch.Generator per image (a view is then a function of its own generator alone,
    whatever the batch), or one generator that the images draw from in turn. rrc: torchvision's
    RandomResizedCrop(scale 0.6-1, ratio 3/4-4/3) + flip; crop: RandomCrop(H, padding 4) + flip, then
    the resize (the CIFAR recipe); flip: the flip alone; none: the evaluation transform `pre`.
    """
    import torch

    if kind == "none":
        return resize_center_crop(images, pre)
    generators = rng if isinstance(rng, (list, tuple)) else [rng] * len(images)
    h, w = images.shape[-2:]
    return torch.stack([crop_resize(image, draw_box(kind, h, w, g), pre.size) for image, g in zip(images, generators)])
