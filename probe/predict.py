"""`probe predict`: a saved head on new image files, through the backbone and preprocessing it records."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from probe.data import read_image, resize_center_crop
from probe.errors import ProbeError
from probe.extract import Embedder, resolve_device
from probe.fit import load_head


def predict(head: str | os.PathLike, images: list[str | os.PathLike], *, top_k: int = 5,
            device: str = "auto") -> list[dict]:
    """Top-k classes with probabilities for each image file.

    Returns one dict per image: {"image", "top": [{"class", "probability"}, ...]} or, for a file
    that cannot be read, {"image", "error"}; the other images are still predicted.
    """
    if top_k < 1:
        raise ProbeError(f"--top-k must be positive, not {top_k}")
    artifact = load_head(head)
    weights = artifact["weights"]
    if weights not in ("default", "none") and not Path(weights).is_file():
        raise ProbeError(f"the head's backbone weights file {weights} is gone; put it back or fit the head again")
    embed = Embedder(artifact["model"], weights, artifact["resolution"], resolve_device(device))
    if embed.spec.feature_dim != artifact["feature_dim"]:
        raise ProbeError(f"head {head} expects {artifact['feature_dim']}-wide features, but {artifact['model']} "
                         f"gives {embed.spec.feature_dim}")
    pipeline, classes = artifact["pipeline"], artifact["classes"]
    results = []
    for image in images:
        try:
            pixels = torch.from_numpy(read_image(image)).permute(2, 0, 1)[None].float().to(embed.device)
        except ProbeError as e:
            results.append({"image": str(image), "error": str(e)})
            continue
        features = embed(resize_center_crop(pixels, embed.resolution)).cpu().numpy()
        probabilities = pipeline.predict_proba(features)[0]
        order = np.argsort(-probabilities)[:top_k]
        results.append({"image": str(image), "top": [
            {"class": classes[int(pipeline.classes_[i])], "probability": float(probabilities[i])} for i in order]})
    return results
