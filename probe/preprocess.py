"""The evaluation transform of a backbone, as data: resize, center crop, normalize.

One Preprocess travels from the model's own configuration (torchvision weights, timm pretrained cfg,
HF image processor, open_clip PreprocessCfg) into the cache key, the head and `probe predict`; one
function, `resize_center_crop`, applies it to float image batches on any device, so extraction,
fine-tuning and prediction give an image the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from probe.errors import ProbeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """An evaluation transform: resize, center crop to `size` x `size`, normalize.

    mode "shortest": the shorter side is resized to `resize` (aspect kept), as torchvision's
    Resize(int); "squash": both sides to `resize`. The center crop takes `size` from that, so
    size / resize is the crop fraction (timm's crop_pct).
    """

    size: int
    resize: int
    interpolation: str = "bilinear"
    mode: str = "shortest"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_offset: str = "round"  # an odd margin: torchvision's CenterCrop rounds it, HF's processors floor it

    def at(self, size: int | None) -> "Preprocess":
        """The same transform at another input size, keeping the crop fraction (None: unchanged)."""
        if size is None or size == self.size:
            return self
        if size < 16:
            raise ProbeError(f"resolution must be at least 16, not {size}")
        return replace(self, size=size, resize=max(size, math.floor(size * self.resize / self.size)))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = [float(v) for v in self.mean], [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, d: dict, resolution: int) -> "Preprocess":
        """Read a cache's or head's record; probe 0.2 and older stored only mean and std, and resized
        straight to the resolution, bilinear: those records keep meaning exactly that."""
        if "size" not in d:
            return cls(resolution, resolution, "bilinear", "shortest", tuple(d["mean"]), tuple(d["std"]))
        return cls(d["size"], d["resize"], d["interpolation"], d["mode"], tuple(d["mean"]), tuple(d["std"]),
                   d.get("crop_offset", "round"))



def dense_preprocess(pre: Preprocess) -> Preprocess:
    """The evaluation transform of dense (segmentation) probing: the whole image squashed to size x size,
    no crop, so that the token grid covers every pixel its mask scores."""
    return replace(pre, resize=pre.size, mode="squash")


def resize_center_crop(images, pre: Preprocess):
    """Apply `pre`'s resize and center crop to float images [N, 3, H, W] in 0..255.

    Sizes and crop offsets are computed as torchvision's Resize(int) and CenterCrop compute them;
    resampling is torch's antialiased kernel (PIL's, for downscaling and upscaling alike), and
    bicubic results are clamped to 0..255 as an 8-bit PIL image would be.
    """
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    if pre.mode == "squash":
        nh = nw = pre.resize
    else:
        long = int(pre.resize * max(h, w) / min(h, w))
        nh, nw = (pre.resize, long) if h <= w else (long, pre.resize)
    if (nh, nw) != (h, w):
        if pre.interpolation == "nearest":
            images = F.interpolate(images, size=(nh, nw), mode="nearest-exact")
        else:
            images = F.interpolate(images, size=(nh, nw), mode=pre.interpolation, antialias=True, align_corners=False)
            if pre.interpolation == "bicubic":
                images = images.clamp(0, 255)
    offset = (lambda margin: int(round(margin / 2.0))) if pre.crop_offset == "round" else (lambda margin: margin // 2)
    top, left = offset(nh - pre.size), offset(nw - pre.size)
    return images[..., top:top + pre.size, left:left + pre.size]
