"""`probe retrieval`: image-to-image retrieval on a feature cache, no head and no training.

Every test image is a query; the gallery is the training split; a gallery image is relevant when it
has the query's class. Similarity is cosine (L2-normalized features, as kNN), and ties in similarity
keep the gallery's order. Metrics, as DINOv2's users and the metric-learning literature report them:
- recall@k: the share of queries with at least one relevant image among their k nearest;
- mAP: the mean over queries of average precision over the whole ranked gallery (the mean of
  precision@i at the rank i of each relevant image).
Each with a 95% percentile bootstrap interval over the queries (probe.stats' resamples and seed).
Writes retrieval.json (metrics, intervals, per-class mAP and the run's identity) in the run folder.

On a caption set's cache (`--dataset captions:FILE`, an image-text model's `--pool proj`), retrieval is
between images and their captions, as CLIP_benchmark's zeroshot_retrieval counts it: text-to-image
("image retrieval") recall@k is the share of captions whose image is among their k best images;
image-to-text ("text retrieval") recall@k the share of images with one of their captions among their k
best captions. The captions go through the model's text tower (cached like zero-shot's text).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

from probe import identity
from probe.cache import open_cache
from probe.errors import ProbeError
from probe.files import atomic_write, make_dir
from probe.runs import folder_name
from probe.stats import METHOD, interval_of_mean

REVISION = 1
KS = (1, 5, 10)
QUERY_CHUNK = 256


def ranks_of_relevant(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                      gallery_labels: np.ndarray, ks=KS, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(hits [n_queries, len(ks)] bool, average precision [n_queries]) of cosine retrieval."""
    import torch

    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32, device=device), dim=1)
    g = torch.nn.functional.normalize(torch.as_tensor(gallery, dtype=torch.float32, device=device), dim=1)
    gl = torch.as_tensor(gallery_labels, device=device)
    positions = torch.arange(1, len(g) + 1, device=device, dtype=torch.float64)
    hits, ap = [], []
    for a in range(0, len(q), QUERY_CHUNK):
        sims = q[a:a + QUERY_CHUNK] @ g.T
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        relevant = gl[order] == torch.as_tensor(query_labels[a:a + QUERY_CHUNK], device=device)[:, None]
        hits.append(torch.stack([relevant[:, :k].any(1) for k in ks], 1).cpu())
        found = relevant.to(torch.float64).cumsum(1)
        n_relevant = relevant.sum(1).clamp(min=1)
        ap.append(((found / positions) * relevant).sum(1).div(n_relevant).cpu())
    return torch.cat(hits).numpy(), torch.cat(ap).numpy()


def retrieval(cache: str | os.PathLike, *, layer: str | None = None, out: str | os.PathLike | None = None,
              runs_dir: str = "runs", device: str = "auto") -> dict:
    """Image-to-image retrieval (test queries against the training gallery) on `cache`; writes retrieval.json."""
    from probe.device import device_type

    c = open_cache(cache)
    if c.attrs.get("task") == "segmentation":
        raise ProbeError(f"{c.path.name} is a segmentation set's cache: retrieval needs class labels")
    if c.key["dataset"].startswith("captions:"):
        if layer is not None:
            raise ProbeError("image-text retrieval compares the image embedding in the text space (--pool proj), "
                             "not a layer: drop --layer")
        return _image_text(c, out, runs_dir, device)
    if "test" not in c.splits:
        raise ProbeError(f"{c.path.name} has no test split: retrieval takes its queries from the test split")
    gallery, gallery_labels = c.load("train", layer)
    queries, query_labels = c.load("test", layer)
    unseen = np.setdiff1d(query_labels, gallery_labels)
    if len(unseen):
        missing = [c.classes[y] for y in unseen]
        raise ProbeError(f"test images of {', '.join(missing)} have no training image of their class: no relevant "
                         "gallery image, so their recall and AP would be 0 by construction")
    spec = identity.normalized({"artifact": "retrieval", "revision": REVISION, "cache": c.key, "layer": layer,
                                "similarity": "cosine", "ks": list(KS)})
    out = Path(out) if out else Path(runs_dir) / folder_name(f"{c.path.stem}__retrieval" +
                                                             (f"__layer-{layer}" if layer else ""), spec)
    t0 = time.perf_counter()
    hits, ap = ranks_of_relevant(queries, query_labels, gallery, gallery_labels, device=device_type(device))
    seconds = time.perf_counter() - t0
    metrics = {"kind": "retrieval", "model": c.key["model"], "dataset": c.key["dataset"], "pool": c.key.get("pool"),
               "layer": layer or "final", "cache": str(c.path.resolve()), "n_queries": int(len(queries)),
               "n_gallery": int(len(gallery)), "queries": "test split", "gallery": "training split",
               "relevance": "same class", "similarity": "cosine",
               **{f"recall@{k}": float(hits[:, i].mean()) for i, k in enumerate(KS)}, "mAP": float(ap.mean()),
               "intervals": {**{f"recall@{k}": interval_of_mean(hits[:, i])
                                for i, k in enumerate(KS)}, "mAP": interval_of_mean(ap)},
               "interval_method": {**METHOD, "method": "percentile bootstrap over queries"},
               "per_class_mAP": {n: float(ap[query_labels == i].mean()) if (query_labels == i).any() else None
                                 for i, n in enumerate(c.classes)},
               "seconds": seconds}
    return _save(out, metrics, spec)


def recall_of_pairs(scores, positive, ks=KS, device: str = "cpu") -> np.ndarray:
    """[n_queries, len(ks)]: whether each query (a row of scores [queries, items]) has a positive item
    (positive: bool, the same shape) among its k best, as CLIP_benchmark's recall@k is counted."""
    import torch

    scores, positive = torch.as_tensor(scores, device=device), torch.as_tensor(positive, device=device)
    out = []
    for a in range(0, len(scores), QUERY_CHUNK):
        top = torch.topk(scores[a:a + QUERY_CHUNK], min(max(ks), scores.shape[1]), dim=1).indices
        hit = positive[a:a + QUERY_CHUNK].gather(1, top)
        out.append(torch.stack([hit[:, :k].any(1) for k in ks], 1).cpu())
    return torch.cat(out).numpy()


def _image_text(c, out, runs_dir: str, device: str) -> dict:
    """Text-to-image and image-to-text retrieval on a caption set's cache, by the model's text tower."""
    from probe import zeroshot
    from probe.datasets import load_dataset
    from probe.device import device_type
    from probe.fit import weights_source

    zeroshot.check_joint(c.key, "image-text retrieval on a caption set")
    data = load_dataset(c.key["dataset"], download=False)
    if data.fingerprint != c.key["fingerprint"]:
        raise ProbeError(f"the images or captions of {c.key['dataset'][len('captions:'):]} changed since "
                         f"{c.path.name} was extracted: run probe extract again")
    texts = [t for captions in data.captions for t in captions]
    owner = np.repeat(np.arange(len(data.captions)), [len(t) for t in data.captions])  # the image of each text
    spec = identity.normalized({"artifact": "retrieval", "revision": REVISION, "cache": c.key,
                                "similarity": "cosine", "ks": list(KS), "kind": "image-text"})
    out = Path(out) if out else Path(runs_dir) / folder_name(f"{c.path.stem}__retrieval", spec)
    t0 = time.perf_counter()
    text, _, _ = zeroshot.text_embeddings(c.key["model"], c.key["weights"], texts, weights_source(c), c.path.parent)
    images, _ = c.load("train")
    images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
    scores = text.astype(np.float32) @ images.T.astype(np.float32)  # [texts, images]
    positive = owner[:, None] == np.arange(len(images))[None]
    kind = device_type(device)
    t2i, i2t = recall_of_pairs(scores, positive, device=kind), recall_of_pairs(scores.T, positive.T, device=kind)
    seconds = time.perf_counter() - t0
    metrics = {"kind": "retrieval", "retrieval": "image-text", "model": c.key["model"], "dataset": c.key["dataset"],
               "pool": c.key.get("pool"), "cache": str(c.path.resolve()), "n_images": int(len(images)),
               "n_texts": int(len(texts)), "similarity": "cosine",
               **{f"image_retrieval_recall@{k}": float(t2i[:, i].mean()) for i, k in enumerate(KS)},
               **{f"text_retrieval_recall@{k}": float(i2t[:, i].mean()) for i, k in enumerate(KS)},
               "intervals": {**{f"image_retrieval_recall@{k}": interval_of_mean(t2i[:, i])
                                for i, k in enumerate(KS)},
                             **{f"text_retrieval_recall@{k}": interval_of_mean(i2t[:, i])
                                for i, k in enumerate(KS)}},
               "interval_method": {**METHOD, "method": "percentile bootstrap over queries (texts for image retrieval, "
                                                       "images for text retrieval)"},
               "seconds": seconds}
    return _save(out, metrics, spec)


def _save(out: Path, metrics: dict, spec: dict) -> dict:
    """retrieval.json in the run folder, with the time and the identity; returns it with the folder."""
    metrics = {**metrics, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
               "identity": spec, "identity_hash": identity.digest(spec)}
    make_dir(out)
    atomic_write(out / "retrieval.json", json.dumps(metrics, indent=2, allow_nan=False).encode())
    return metrics | {"out": str(out)}
