"""`probe predict`: a saved head on new image files, through the backbone and preprocessing it records."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from probe.backbones import Preprocess, resolve
from probe.datasets import read_image
from probe.preprocess import resize_center_crop
from probe.device import resolve_device
from probe.errors import ProbeError
from probe.extract import Embedder
from probe.heads import rank_classes
from probe.runs import load_head
from probe.stats import apply_temperature

BATCH_SIZE = 64  # images per backbone pass


def predict(head: str | os.PathLike, images: list[str | os.PathLike], *, top_k: int = 5,
            device: str = "auto", trust_pickle: bool = False) -> list[dict]:
    """Top-k classes with probabilities for each image file.

    Returns one dict per image: {"image", "top": [{"class", "probability"}, ...]} or, for a file
    that cannot be read, {"image", "error"}; the other images are still predicted.
    """
    if top_k < 1:
        raise ProbeError(f"--top-k must be positive, not {top_k}")
    artifact = load_head(head, trust_pickle=trust_pickle)
    check_backbone(artifact)
    if artifact.get("task") == "segmentation":
        raise ProbeError(f"{head} is a segmentation head: probe predict --masks DIR writes its masks")
    # The preprocessing and pool the cache was extracted with (heads of probe 0.2 record the older transform).
    weights = artifact["weights"]
    pre = Preprocess.from_dict(artifact["preprocessing"], artifact["resolution"])
    layers = artifact.get("layers") or []  # a head fitted on layers (probe fit --layer) gets those columns
    tokens = artifact.get("tokens")  # a head on token maps (--head attentive) gets them, pooled to the same grid
    # The arithmetic the cache was extracted with, so the head sees features as it was fitted on them.
    embed = Embedder(artifact["model"], weights, pre, artifact.get("pool"), resolve_device(device), layers=layers,
                     precision=artifact.get("precision", "fp32"), compiled=artifact.get("compile", False),
                     tokens=tokens["grid"] if tokens else None)
    width = sum(embed.layer_dims.values()) if layers else int(np.prod(embed.token_shape)) if tokens else embed.feature_dim
    if width != artifact["feature_dim"]:
        raise ProbeError(f"head {head} expects {artifact['feature_dim']}-wide features, but {artifact['model']} "
                         f"gives {width}")
    pipeline = artifact["pipeline"]

    def probabilities(pixels):
        features = embed(pixels)
        if layers:  # [final | layers]: the head saw the layers alone
            features = features[:, embed.feature_dim:]
        if tokens:
            features = embed.last_tokens
        p = pipeline.predict_proba(features.cpu().numpy())
        if artifact.get("temperature"):  # fitted with --calibrate temperature
            p = apply_temperature(p, artifact["temperature"])
        return p

    names = [artifact["classes"][int(c)] for c in pipeline.classes_]  # the probabilities' columns
    return classify(images, pre, probabilities, names, top_k, embed.device)


def check_backbone(artifact: dict) -> None:
    """Refuse a head whose backbone weights are gone or changed since it was fitted."""
    weights, spec = artifact["weights"], resolve(artifact["model"])
    if weights not in ("default", "none") and not Path(weights).exists():
        raise ProbeError(f"the head's backbone weights file {weights} is gone; put it back or fit the head again")
    if artifact["weights_identity"] not in ("default", "none"):  # a file, a folder, a saved model's own weights
        now = spec.weights_identity(weights)
        if now != artifact["weights_identity"]:
            raise ProbeError(f"the head's backbone weights ({weights} of {artifact['model']}) has changed since the "
                             f"head was fitted (now {now}, fitted on {artifact['weights_identity']}); put the "
                             "original back or fit the head again")


def predict_masks(head: str | os.PathLike, images: list, out_dir: str | os.PathLike, device: str = "auto",
                  trust_pickle: bool = False) -> list[dict]:
    """A segmentation head's colored mask of each image, written to out_dir (probe.segment.predict_masks)."""
    from probe import segment

    artifact = load_head(head, trust_pickle=trust_pickle)
    if artifact.get("task") != "segmentation":
        raise ProbeError(f"{head} is a classification head: --masks is for --head seg-linear runs")
    check_backbone(artifact)
    return segment.predict_masks(artifact, images, out_dir, device)


def classify(images: list, pre: Preprocess, probabilities, names: list[str], top_k: int, device=None) -> list[dict]:
    """Each image file decoded, resized and center-cropped as `pre` says, in batches of BATCH_SIZE through
    probabilities(pixels [N, 3, S, S] float 0..255) -> [N, len(names)]; the top_k classes of each, or
    the error of a file that cannot be read (the others are still classified). probe predict and
    probe predict --model-file share it."""
    results: list[dict] = [{"image": str(image)} for image in images]
    batch, rows = [], []

    def flush():
        if not batch:
            return
        p = np.asarray(probabilities(torch.stack(batch)))
        for row, q, order in zip(rows, p, rank_classes(p)[:, :top_k]):
            results[row]["top"] = [{"class": names[i], "probability": float(q[i])} for i in order]
        batch.clear()
        rows.clear()

    for row, image in enumerate(images):
        try:
            pixels = torch.from_numpy(read_image(image)).permute(2, 0, 1)[None].float().to(device or "cpu")
        except ProbeError as e:
            results[row]["error"] = str(e)
            continue
        batch.append(resize_center_crop(pixels, pre)[0])
        rows.append(row)
        if len(batch) == BATCH_SIZE:
            flush()
    flush()
    return results
