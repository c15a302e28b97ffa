"""Which rows of a feature cache a fit (or fine-tune) trains and tests on, worked out from the labels
alone and seeded: the classes kept, a balanced subset of train, and for a data set without a test split
a stratified test split held out of train before anything else sees it."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from probe.cache import FeatureCache
from probe.datasets.base import OFFICIAL_TEST
from probe.errors import ProbeError
from probe.rows import Part, Rows

TEST_FRACTION = 0.2  # held out of train as the test split when a data set has none


class Plan(NamedTuple):
    """Which rows of a cache a fit trains and tests on, worked out from the labels alone."""
    names: list[str]  # the kept classes; labels are indices into it
    train_rows: np.ndarray  # rows of the cache's train split
    y: np.ndarray
    test_source: str  # the cache split the test rows are of: "test", or "train" when held out of it
    test_rows: np.ndarray
    yt: np.ndarray
    test_split: str  # how the test split was made


class Selection(NamedTuple):
    names: list[str]  # the kept classes; labels are indices into it
    X: np.ndarray
    y: np.ndarray
    Xt: np.ndarray
    yt: np.ndarray
    test_split: str  # how the test split was made
    train_rows: np.ndarray  # rows of the cache's train split that X holds (for its augmented views)


def plan(cache: FeatureCache, *, classes: list[str] | None = None, train_per_class: int | None = None,
         seed: int = 0, test_fraction: float | None = None) -> Plan:
    """Keep only `classes` (names or indices), and take a balanced seeded subset of train.

    A cache without a test split (a folder with train/ only) gets one: a stratified `test_fraction`
    (default 0.2) of its training images, held out before anything else sees train. It is the same
    whatever `seed` (HOLDOUT_SEED draws it), so runs of every seed are scored on the same images and
    compare pairwise. Labels are renumbered 0..len(classes)-1.
    """
    if cache.key["dataset"].startswith("captions:"):
        raise ProbeError(f"{cache.path.name} holds a caption set's images (each its own class): it is for probe "
                         "retrieval, not for fitting a head")
    keep = class_indices(cache.classes, classes)
    y = cache.labels("train")
    index = np.arange(len(y))
    if "test" in cache.splits:
        if test_fraction is not None:
            raise ProbeError(f"{cache.path.name} has a test split; --test-fraction is for data sets without one")
        test_source, yt = "test", cache.labels("test")
        test_index = np.arange(len(yt))
        test_split = cache.attrs.get("protocol") or OFFICIAL_TEST  # caches of probe 0.3 and older: no protocol
    else:
        fraction = TEST_FRACTION if test_fraction is None else test_fraction
        if not 0 < fraction < 1:
            raise ProbeError(f"--test-fraction must be between 0 and 1, not {fraction}")
        train_rows, test_rows = holdout_rows(y, keep, fraction, cache.classes)
        test_source, yt, test_index = "train", y[test_rows], test_rows
        y, index = y[train_rows], train_rows
        test_split = holdout_description(fraction, len(test_rows))
    remap = np.full(len(cache.classes), -1)
    remap[keep] = np.arange(len(keep))
    rows = balanced_rows(y, keep, train_per_class, seed, cache.classes, cache.path.name)
    test_rows = np.flatnonzero(np.isin(yt, keep))
    if not len(test_rows):
        raise ProbeError(f"{cache.path.name} has no test images of the selected classes; choose others with --classes")
    return Plan([cache.classes[c] for c in keep], index[rows], remap[y[rows]], test_source, test_index[test_rows],
                remap[yt[test_rows]], test_split)


def select(cache: FeatureCache, *, classes: list[str] | None = None, train_per_class: int | None = None,
           seed: int = 0, test_fraction: float | None = None, layer: str | None = None) -> Selection:
    """plan(), with the features in memory. layer: a layer the cache holds, or last4 (None: the final feature)."""
    p = plan(cache, classes=classes, train_per_class=train_per_class, seed=seed, test_fraction=test_fraction)
    train, test = stores(cache, p, layer)
    return Selection(p.names, train.load(), p.y, test.load(), p.yt, p.test_split, p.train_rows)


def stores(cache: FeatureCache, p: Plan, layer: str | None = None, views: int = 0,
           budget: int | None = None) -> tuple[Rows, Rows]:
    """The training rows (with `views` augmented views of each, as more rows) and the test rows of a plan,
    read a chunk at a time within `budget` bytes (None: no limit)."""
    parts = [Part(cache.columns("train", layer), None, p.train_rows, p.y, np.arange(len(p.y)))]
    parts += [Part(["train/views"], v, p.train_rows, p.y, np.arange(len(p.y))) for v in range(views)]
    test = Part(cache.columns(p.test_source, layer), None, p.test_rows, p.yt, np.arange(len(p.yt)))
    path, key_hash = cache.path.resolve(), cache.attrs["key_hash"]  # a streamed kNN head keeps both
    return Rows(path, parts, budget, key_hash=key_hash), Rows(path, [test], budget, keep=False, key_hash=key_hash)


HOLDOUT_SEED = 0


def holdout_description(fraction: float, n_test: int) -> str:
    return (f"held out of train: {fraction:g} of each class (at least one, at most all but one), "
            f"{n_test} images, stratified, seed {HOLDOUT_SEED} whatever --seed")


def holdout_rows(labels: np.ndarray, keep: list[int], fraction: float, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of the kept classes: a stratified split, at least one of each class on each
    side, each class's images ordered by a generator seeded by (HOLDOUT_SEED, class) alone: the same test
    images for every seed, and for a class whatever other classes are kept."""
    train, test = [], []
    for c in keep:
        rows = np.random.default_rng((HOLDOUT_SEED, int(c))).permutation(np.flatnonzero(labels == c))
        if len(rows) < 2:
            raise ProbeError(f"class {names[c]!r} has {len(rows)} image(s): too few to hold out a test split; "
                             "add images or a test/ folder")
        n_test = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def balanced_rows(labels: np.ndarray, keep: list[int], per_class: int | None, seed: int, names: list[str],
                   source: str) -> np.ndarray:
    """Rows of the kept classes; with per_class, a seeded episode of exactly that many of each.

    Each class's images are drawn in an order seeded by (seed, class) alone, and an episode of k takes
    the first k: the same images for every model, layer and head on the data set (paired comparisons),
    whatever other classes are kept, and nested (the 2-shot episode of a seed holds its 1-shot one).
    """
    rows = np.flatnonzero(np.isin(labels, keep))
    if per_class is None:
        return rows
    if per_class < 1:
        raise ProbeError(f"--train-per-class must be positive, not {per_class}")
    chosen = []
    for c in keep:
        of_class = rows[labels[rows] == c]
        if len(of_class) < per_class:
            raise ProbeError(f"--train-per-class {per_class}, but class {names[c]!r} has only "
                             f"{len(of_class)} training images in {source}")
        chosen.append(np.random.default_rng((seed, int(c))).permutation(of_class)[:per_class])
    return np.sort(np.concatenate(chosen))


def class_indices(names: list[str], wanted: list[str] | None) -> list[int]:
    if not wanted:
        return list(range(len(names)))
    indices = []
    for w in wanted:
        if w in names:
            indices.append(names.index(w))
        elif w.isdigit() and int(w) < len(names):
            indices.append(int(w))
        else:
            raise ProbeError(f"unknown class {w!r}: the cache has {', '.join(names)} (or indices 0-{len(names) - 1})")
    if len(set(indices)) < 2:
        raise ProbeError("--classes needs at least two different classes")
    return sorted(set(indices))


def test_set_identity(*, dataset: str, fingerprint: str, protocol: str, source: str, split: str, classes: list[str],
                      rows: np.ndarray, labels: np.ndarray) -> dict:
    """The identity of the test images a run is scored on (the data, how its test split was made, the classes
    kept, and which rows with which labels): fits and fine-tunes compare pairwise only when it is equal."""
    import hashlib

    digest = hashlib.sha256(np.asarray(rows, np.int64).tobytes() + np.asarray(labels, np.int64).tobytes())
    return {"dataset": dataset, "fingerprint": fingerprint, "protocol": protocol, "source": source, "split": split,
            "classes": list(classes), "rows": digest.hexdigest()[:16]}
