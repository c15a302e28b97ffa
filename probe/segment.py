"""`probe fit --head seg-linear`: a linear segmentation probe on a segmentation set's token cache, scored by
mIoU at the masks' own resolution, and `probe predict` of such a head (a colored mask per image).

The cache (probe extract --tokens on ade20k, voc2012_seg, cityscapes or folder-seg:) holds every image's
token map [G * G * C] and its mask at token resolution (each cell's most frequent class). Training: every
labelled token is a row, read a block of images at a time in a seeded order (so a cache larger than
memory trains), through heads.SegLinearProbe (batch norm and a 1x1 convolution: DINOv2's linear head).
Scoring: the logits of the G x G grid bilinearly upsampled to each test image's own size (the image
was squashed to the backbone's input whole, so the grid covers it all), argmax, and per class the
intersection and union with the full-resolution mask, ignored pixels left out (mmsegmentation's
`intersect_and_union`); mIoU is the mean over classes present in the prediction or the truth of summed
intersections over summed unions, pixel accuracy their total, each with a percentile bootstrap interval
over the test images.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import h5py
import numpy as np

from probe import identity, stats
from probe.cache import FeatureCache
from probe.datasets.segmentation import IGNORE
from probe.errors import ProbeError
from probe.heads import make_head
from probe.runs import HEAD_FORMAT, FitResult, folder_name, save_run

REVISION = 1
BLOCK_BYTES = 256 << 20  # token maps read at once while training (float32)


def fit(cache: FeatureCache, *, seed: int = 0, epochs: int | None = None, device: str = "auto", out: str | None = None,
        runs_dir: str = "runs", weights: str = "default", reuse: bool = False, identity_only: bool = False):
    """Fit seg-linear on `cache` (a segmentation set's token cache), score it on its test split, save it
    (identity_only: return the run's identity, fitting nothing)."""
    from probe.fit import weights_source
    from probe.runs import finished

    if cache.attrs.get("task") != "segmentation":
        raise ProbeError(f"--head seg-linear needs a segmentation set's token cache (ade20k, voc2012_seg, cityscapes, "
                         f"folder-seg:PATH with probe extract --tokens); {cache.path.name} holds class labels")
    if "test" not in cache.splits:
        raise ProbeError(f"{cache.path.name} has no test split to score on")
    side, _, width = cache.token_shape
    estimator = make_head("seg-linear", epochs=epochs, random_state=seed, device=device)
    spec = identity.normalized({"artifact": "fit", "revision": REVISION, "cache": cache.key, "head": "seg-linear",
                                "params": {k: v for k, v in estimator.get_params().items() if k != "device"},
                                "seed": seed})
    if identity_only:
        return spec
    out_dir = Path(out) if out else Path(runs_dir) / folder_name(f"{cache.path.stem}__seg-linear", spec)
    if reuse and (done := finished(out_dir, spec)) is not None:
        return FitResult(out_dir, done, reused=True)
    with h5py.File(cache.path, "r") as f:
        cells = f["train/masks"][...]
    labels = cells[cells != IGNORE].astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise ProbeError(f"the training masks of {cache.path.name} hold {len(np.unique(labels))} class(es): a "
                         "segmentation head needs at least two")
    t0 = time.perf_counter()
    estimator.fit_chunks(lambda epoch, batch: _token_batches(cache, cells, side * side, width, seed, epoch, batch),
                         labels, width)
    fit_seconds = time.perf_counter() - t0
    scores = score(cache, estimator)
    n_classes = len(cache.classes)
    metrics = {
        "kind": "fit", "method": "seg-linear", "task": "segmentation", "model": cache.key["model"],
        "pool": cache.key.get("pool"), "layer": "tokens", "token_shape": [side, side, width],
        "weights": cache.key["weights"], "resolution": cache.key["resolution"], "dataset": cache.key["dataset"],
        "cache": str(cache.path.resolve()), "classes": cache.classes, "n_train": int(len(cells)),
        "n_train_tokens": int(len(labels)), "n_test": scores["n_test"], "test_split": "test",
        "mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"],
        # The classification fields other commands read, for segmentation: the share of pixels right.
        "test_accuracy": scores["pixel_accuracy"],
        "intervals": {"mean_iou": scores["mean_iou_interval"], "pixel_accuracy": scores["pixel_accuracy_interval"],
                      "test_accuracy": scores["pixel_accuracy_interval"]},
        "interval_method": stats.METHOD,
        "per_class_iou": {cache.classes[c]: v for c, v in enumerate(scores["per_class_iou"]) if c < n_classes},
        "classes_never_trained": [cache.classes[c] for c in range(n_classes) if c not in set(estimator.classes_)],
        "hyperparameters": {k: v for k, v in estimator.get_params().items() if isinstance(v, (int, float, str))},
        "seed": seed, "trainable_parameters": sum(p.numel() for p in estimator.module_.parameters()),
        "fit_seconds": fit_seconds, "wall_seconds": time.perf_counter() - t0,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "identity": spec, "identity_hash": identity.digest(spec),
    }
    key = cache.key
    artifact = {"format": HEAD_FORMAT, "task": "segmentation", "pipeline": estimator, "classes": cache.classes,
                "model": key["model"], "weights": weights_source(cache, weights), "weights_identity": key["weights"],
                "resolution": key["resolution"], "preprocessing": key["preprocessing"], "pool": key.get("pool"),
                "feature_dim": int(side * side * width), "layers": [],
                "tokens": {"grid": key["tokens"]["grid"], "shape": [side, side, width]},
                "precision": key.get("precision", "fp32"), "compile": False, "cache": str(cache.path.resolve()),
                "cache_key": key, "identity": spec, "temperature": None}
    save_run(out_dir, artifact, metrics)
    return FitResult(out_dir, metrics)


def _token_batches(cache: FeatureCache, cells: np.ndarray, n_tokens: int, width: int, seed: int, epoch: int, batch: int):
    """Minibatches (tokens [batch, C] float32, classes) of every labelled token, an epoch's blocks of images in
    a seeded order and the tokens of a block shuffled, reading one block at a time."""
    rng = np.random.default_rng((seed, epoch))
    per_block = max(1, BLOCK_BYTES // (4 * n_tokens * width))
    order = rng.permutation(len(cells))
    with h5py.File(cache.path, "r") as f:
        stored = f["train/tokens"]
        for start in range(0, len(order), per_block):
            rows = np.sort(order[start:start + per_block])
            X = stored[rows].astype(np.float32).reshape(-1, width)
            y = cells[rows].reshape(-1).astype(np.int64)
            keep = rng.permutation(np.flatnonzero(y != IGNORE))
            for i in range(0, len(keep), batch):
                take = keep[i:i + batch]
                yield X[take], y[take]


def logits(head, tokens, shape: tuple[int, int, int]):
    """Class logits [N, K, G, G] (K: the classes the head knows, head.classes_) of token maps [N, G * G * C]."""
    import torch

    side, _, width = shape
    x = torch.as_tensor(tokens, dtype=torch.float32).reshape(-1, width)
    with torch.inference_mode():
        out = head.module_(x)
    return out.reshape(-1, side, side, out.shape[1]).permute(0, 3, 1, 2)


def label_map(head, grid_logits, size: tuple[int, int]) -> np.ndarray:
    """The class index of every pixel of an image of `size` (H, W) from its grid logits [K, G, G]: bilinear
    upsampling (align_corners False, as DINOv2's and mmsegmentation's resize), then argmax."""
    import torch

    up = torch.nn.functional.interpolate(grid_logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return np.asarray(head.classes_)[up.argmax(0).numpy()]


def score(cache: FeatureCache, head, batch_images: int = 32) -> dict:
    """mIoU and pixel accuracy of `head` on the test split at the masks' own resolution, with intervals."""
    n_classes = len(cache.classes)
    with h5py.File(cache.path, "r") as f:
        stored, full, shapes = f["test/tokens"], f["test/full_masks"], f["test/mask_shapes"][...]
        n = len(shapes)
        counts = np.zeros((n, 3, n_classes), np.int64)  # per image: intersection, predicted area, true area
        for start in range(0, n, batch_images):
            grid = logits(head, stored[start:start + batch_images], cache.token_shape)
            for i, g in enumerate(grid):
                row = start + i
                true = full[row].reshape(shapes[row]).astype(np.int64)
                valid = true != IGNORE
                pred, true = label_map(head, g, shapes[row])[valid], true[valid]
                counts[row, 0] = np.bincount(pred[pred == true], minlength=n_classes)
                counts[row, 1] = np.bincount(pred, minlength=n_classes)
                counts[row, 2] = np.bincount(true, minlength=n_classes)
    miou, accuracy, per_class = _iou(counts.sum(0))
    rng = np.random.default_rng(stats.SEED)
    resampled = [_iou(counts[rng.integers(0, n, n)].sum(0))[:2] for _ in range(stats.RESAMPLES)]
    return {"n_test": int(n), "mean_iou": miou, "pixel_accuracy": accuracy, "per_class_iou": per_class,
            "mean_iou_interval": stats._interval(np.array([r[0] for r in resampled])),
            "pixel_accuracy_interval": stats._interval(np.array([r[1] for r in resampled]))}


def _iou(total: np.ndarray) -> tuple[float, float, list]:
    """(mIoU over the classes with a union, pixel accuracy, per-class IoU or None) of summed counts [3, K]."""
    intersection, predicted, true = total
    union = predicted + true - intersection
    present = union > 0
    per_class = [float(i / u) if u else None for i, u in zip(intersection, union)]
    return float((intersection[present] / union[present]).mean()), float(intersection.sum() / max(1, true.sum())), per_class


def predict_masks(artifact: dict, images: list, out_dir: str | Path, device: str = "auto") -> list[dict]:
    """A colored mask PNG (palette: VOC's colour map, class index = palette index) of each image, at the
    image's own size, in out_dir; returns {"image", "mask", "classes"} or {"image", "error"} for each."""
    import torch
    from PIL import Image

    from probe.backbones import Preprocess
    from probe.datasets import read_image
    from probe.device import resolve_device
    from probe.extract import Embedder
    from probe.files import atomic_write, make_dir
    from probe.preprocess import resize_center_crop

    pre = Preprocess.from_dict(artifact["preprocessing"], artifact["resolution"])
    shape = tuple(artifact["tokens"]["shape"])
    embed = Embedder(artifact["model"], artifact["weights"], pre, artifact.get("pool"), resolve_device(device),
                     precision=artifact.get("precision", "fp32"), tokens=artifact["tokens"]["grid"])
    if embed.token_shape != shape:
        raise ProbeError(f"the head expects {shape} token maps, but {artifact['model']} gives {embed.token_shape}")
    stems = [Path(image).stem for image in images]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        raise ProbeError(f"two images would write the same mask {clash}.png: give images of different names, or "
                         "predict them into different --masks folders")
    head, out_dir = artifact["pipeline"], make_dir(out_dir)
    palette = voc_palette()
    results = []
    for image in images:
        try:
            pixels = read_image(image)
        except ProbeError as e:
            results.append({"image": str(image), "error": str(e)})
            continue
        batch = resize_center_crop(torch.from_numpy(pixels).permute(2, 0, 1)[None].float().to(embed.device), pre)
        embed(batch)
        classes = label_map(head, logits(head, embed.last_tokens.cpu(), shape)[0], pixels.shape[:2])
        mask = Image.fromarray(classes.astype(np.uint8), mode="P")
        mask.putpalette(palette)
        target = out_dir / f"{Path(image).stem}.png"
        atomic_write(target, lambda f, mask=mask: mask.save(f, format="PNG"))
        present = np.unique(classes)
        results.append({"image": str(image), "mask": str(target),
                        "classes": {artifact["classes"][c]: float((classes == c).mean()) for c in present}})
    return results


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map for 256 indices (the bits of the index spread over R, G and B), flat."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
