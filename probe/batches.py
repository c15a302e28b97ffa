"""Images to float batches on the device: the one preprocessing path of extraction, fine-tuning and
prediction, and the augmented views.

Small images (CIFAR-sized) are decoded once into one uint8 array and resized on the device in
batches; large images, and any data set too big to hold decoded, are decoded and resized in
DataLoader workers. Both paths use `resize_center_crop`, and so does `probe predict`, so an image gets
the same pixels whichever way it reaches the backbone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from probe.datasets import Split
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


def loader_workers() -> int:
    """DataLoader workers for decoding: this process's share of the cores (torchrun's ranks on one machine,
    LOCAL_WORLD_SIZE, share them), at most 8."""
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, cores))


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
    workers = loader_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _DecodeResize(split, start, stop, pre), batch_size=batch_size, num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    row = start
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        yield batch if transform is None else transform(batch, row)
        row += len(batch)
