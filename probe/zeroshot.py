"""Zero-shot classification on a cache of image embeddings: the text side of `probe fit --head zeroshot`.

An image-text model (open_clip:, or an hf: CLIP or SigLIP) embeds images and texts in one space. A
class's embedding is the normalized mean of the normalized text embeddings of its name in every prompt
template ("a photo of a {c}."), as the CLIP paper's notebook, open_clip's build_zero_shot_classifier
and CLIP_benchmark compute it; an image is scored by the model's own logit_scale * cosine (+ SigLIP's
bias) against every class (probe.heads.ZeroShotHead). The image side is the cache: extracted with the
model's joint pool (`--pool proj`), so no image passes through the backbone again.

Class names and templates: for the named data sets, the CLIP paper's as CLIP_benchmark ships them
(probe/prompts.json says the source); a data set without its own names uses its class names made
readable (`golden_retriever` -> "golden retriever"); one without its own templates uses the CLIP paper's
80 ImageNet templates. `--class-text FILE` (one per line, in the data set's class order) and
`--templates FILE` (one per line, each with `{c}`) override them. The text embeddings are cached under
the cache folder's `text/`, keyed by the model, its weights and the texts (names in templates).
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from probe import identity
from probe.errors import ProbeError
from probe.files import atomic_write, make_dir

REVISION = 1
BATCH = 256  # texts per forward pass of the text tower


@lru_cache(maxsize=1)
def prompts() -> dict:
    return json.loads((Path(__file__).parent / "prompts.json").read_text())


def benchmark_name(dataset: str) -> str:
    """The data set's name among the named sets (the bundled sample is CIFAR-10's), or its key as given."""
    return "cifar10" if dataset == "sample" else dataset


def readable(name: str) -> str:
    """A folder's class name as text: underscores and hyphens become spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def _lines(path: str, what: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"cannot read {what} file {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ProbeError(f"{what} file {path} is empty: give one per line")
    return lines


def class_names(dataset: str, classes: list[str], file: str | None = None) -> list[str]:
    """The text of each of the data set's classes, in its class order."""
    if file is not None:
        names = _lines(file, "--class-text")
        if len(names) != len(classes):
            raise ProbeError(f"--class-text {file} has {len(names)} names and the data set {len(classes)} classes: "
                             f"give one per line, in the data set's class order ({', '.join(classes[:3])}, ...)")
        return names
    known = prompts()["class_names"].get(benchmark_name(dataset))
    if known is not None and len(known) == len(classes):
        return list(known)
    return [readable(c) for c in classes]


def templates(dataset: str, file: str | None = None) -> list[str]:
    """The prompt templates, each with `{c}` where the class name goes."""
    if file is not None:
        found = _lines(file, "--templates")
        bad = [t for t in found if "{c}" not in t]
        if bad:
            raise ProbeError(f"--templates {file}: every template needs {{c}} where the class name goes, not {bad[0]!r}")
        return found
    return list(prompts()["templates"].get(benchmark_name(dataset), prompts()["default_templates"]))


def text_identity(cache_key: dict, names: list[str], templates: list[str]) -> dict:
    """What the class embeddings depend on: the model, its weights, the class names and the templates."""
    return {"artifact": "text_embeddings", "revision": REVISION, "model": cache_key["model"],
            "weights": cache_key["weights"], "class_names": list(names), "templates": list(templates)}


def check_joint(cache_key: dict, what: str = "--head zeroshot") -> None:
    """A one-line error unless the cache holds a text tower's joint embeddings; `what` needs them."""
    from probe.backbones import resolve

    spec = resolve(cache_key["model"])
    if spec.joint_pool is None:
        raise ProbeError(f"{spec.name} has no text tower: {what} needs an image-text model's cache, such as "
                         "open_clip:ARCH/TAG or an hf: CLIP or SigLIP model extracted with --pool proj")
    if cache_key.get("pool") != spec.joint_pool or cache_key.get("layers"):
        raise ProbeError(f"this cache holds {spec.name}'s --pool {cache_key.get('pool')} feature, not the image embedding "
                         f"in the text space that {what} needs: run probe extract with --pool {spec.joint_pool} (and the "
                         "same other options)")


def _check_weights(model: str, weights_identity: str, weights: str) -> None:
    """The text tower must be the image tower's: a saved model's folder (or a weights file) that changed since
    the extraction is refused, as probe predict refuses it."""
    from probe.backbones import resolve

    if weights_identity in ("default", "none"):
        return
    now = resolve(model).weights_identity(weights)
    if now != weights_identity:
        raise ProbeError(f"the weights of {model} changed since its image features were extracted (now {now}, "
                         f"extracted with {weights_identity}): put the original back, or extract again")


def text_embeddings(model: str, weights_identity: str, texts: list[str], weights: str,
                    cache_dir: str | Path) -> tuple[np.ndarray, float, float]:
    """(each text's L2-normalized embedding [n, d], logit scale, logit bias) by the text tower of `model`;
    weights: what rebuilds it (probe.fit.weights_source), weights_identity: the cache key's. Kept in
    cache_dir/text/, keyed by the model, its weights' identity and the texts."""
    spec = {"artifact": "text_embeddings", "revision": REVISION, "model": model, "weights": weights_identity,
            "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(), "n_texts": len(texts)}
    path = Path(cache_dir) / "text" / f"{identity.digest(spec)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                if identity.same(json.loads(str(f["identity"])), spec):
                    return f["embeddings"], float(f["logit_scale"]), float(f["logit_bias"])
        except (OSError, ValueError, KeyError):  # damaged: computed again, and replaced
            pass
    from probe.backbones import text_tower

    if not texts:
        raise ProbeError("no text to embed")
    _check_weights(model, weights_identity, weights)
    tower = text_tower(model, weights)
    encoded = np.concatenate([tower.encode(texts[i:i + BATCH]).numpy() for i in range(0, len(texts), BATCH)])
    encoded = encoded.astype(np.float64)
    embeddings = (encoded / np.linalg.norm(encoded, axis=1, keepdims=True)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, logit_scale=tower.logit_scale, logit_bias=tower.logit_bias,
             identity=json.dumps(spec))
    make_dir(path.parent)
    atomic_write(path, buffer.getvalue())
    return embeddings, tower.logit_scale, tower.logit_bias


def class_embeddings(spec: dict, weights: str, cache_dir: str | Path) -> tuple[np.ndarray, float, float]:
    """(class embeddings [n_classes, d], logit scale, logit bias) for text_identity `spec`; weights: what
    rebuilds the model (probe.fit.weights_source). The normalized mean over templates of each class's
    normalized text embeddings, normalized."""
    texts = [t.replace("{c}", name) for name in spec["class_names"] for t in spec["templates"]]
    encoded, scale, bias = text_embeddings(spec["model"], spec["weights"], texts, weights, cache_dir)
    mean = encoded.astype(np.float64).reshape(len(spec["class_names"]), len(spec["templates"]), -1).mean(1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32), scale, bias


def weights_after(steps: list, embeddings: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """The zero-shot classifier as a linear layer [n_classes, d + 1] (weights, bias) on features that went
    through `steps` (fitted: a Normalizer, then optionally a StandardScaler): the same logits. On a unit
    feature u the logits are scale * W u + bias; a scaler gives z = (u - mean) / s, so u = z * s + mean
    and the logits are (scale * W * s) z + scale * W mean + bias."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    if not steps or not isinstance(steps[0], Normalizer):
        raise ProbeError("the zero-shot weights are a linear layer only on unit-length features (--normalize l2 "
                         "or l2+standardize)")
    W, b = scale * embeddings.astype(np.float64), np.full(len(embeddings), float(bias))
    for step in steps[1:]:
        if isinstance(step, StandardScaler):
            b = b + W @ step.mean_
            W = W * step.scale_
    return np.concatenate([W, b[:, None]], 1)
