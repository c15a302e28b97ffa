"""`probe fit --dataset imagenet --eval imagenet_v2,imagenet_r,...`: one ImageNet head scored on the
distribution-shift test sets (probe.datasets.imagenet), each from its own cache of the same features.

A shift set's classes are groups of ImageNet classes (WordNet ids): one each for ImageNet-V2, -R, -A and
-Sketch, one or more for ObjectNet's. The head's probabilities are restricted to the ImageNet classes the
set covers before the argmax (ImageNet-R and -A: their 200, hendrycks' `indices_in_1k`; ObjectNet: the
classes its 113 map to), and a prediction is right when the class it picks is in the true class's group.
The index of the pick is an index into the restricted columns, mapped back to its ImageNet class before
it is compared (`restricted_predictions`). Scoring R and A over all 1000 logits instead is what timm #176
ran into; natural-adv-examples' PR #15 (open) argues for it. Both numbers are reported, under their names
(tests/test_imagenet.py builds a case where restricting changes the answer).
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from probe import identity, stats
from probe.cache import FeatureCache, open_cache
from probe.errors import ProbeError

DIFFERENT = ("dataset", "fingerprint", "protocol")  # what a shift set's cache differs in from the ImageNet one
CHUNK = 8192  # rows scored at a time


def head_wnids(cache: FeatureCache, kept: list[int]) -> list[str]:
    """The WordNet id of each class a head on `cache` knows (kept: the cache's class indices it was fitted on)."""
    if "wnids" in cache.attrs:
        ids = json.loads(cache.attrs["wnids"])
    elif len(cache.classes) == 1000:  # hf:imagenet-1k and other 1000-class copies: ImageNet's order, by index
        from probe.datasets.imagenet import wnids

        ids = wnids()
    else:
        raise ProbeError(f"--eval scores an ImageNet head: {cache.path.name} is of {cache.key['dataset']} "
                         f"({len(cache.classes)} classes, no WordNet ids); fit on --dataset imagenet")
    return [ids[i] for i in kept]


def find_caches(cache: FeatureCache, names: list[str]) -> list[FeatureCache]:
    """For each shift set, the cache beside `cache` with the same key but for the data set."""
    from probe.datasets import NAMED
    from probe.datasets.imagenet import SHIFTS

    found = []
    for name in names:
        if name not in SHIFTS:
            raise ProbeError(f"--eval {name}: choose among the shift sets {', '.join(SHIFTS)}"
                             + ("" if name in NAMED else " (probe datasets lists them)"))
        match = None
        for candidate in sorted(cache.path.parent.glob(f"{name}__*.h5")):
            other = open_cache(candidate)  # one that cannot be read is named, not passed over
            if identity.same({k: v for k, v in other.key.items() if k not in DIFFERENT},
                             {k: v for k, v in cache.key.items() if k not in DIFFERENT}):
                match = other
        if match is None:
            key = cache.key
            raise ProbeError(f"no cache of {name} with the features of {cache.path.name}; run: probe extract --dataset "
                             f"{name} --model {key['model']} (and the options {cache.path.name} was extracted with)")
        found.append(match)
    return found


def restricted_predictions(probabilities: np.ndarray, column_wnids: list[str], groups: list[list[str]]) -> np.ndarray:
    """The class of a shift set each row is predicted as (an index into `groups`): the argmax over the columns
    whose WordNet id is in some group, that column's id mapped back to its group."""
    group_of = {w: g for g, members in enumerate(groups) for w in members}
    missing = sorted({w for members in groups for w in members} - set(column_wnids))
    if missing:
        raise ProbeError(f"the head does not know ImageNet class {missing[0]} ({len(missing)} of the set's classes "
                         "missing): fit it on all of ImageNet's classes")
    allowed = np.array([c for c, w in enumerate(column_wnids) if w in group_of])
    picked = allowed[np.argmax(probabilities[:, allowed], axis=1)]  # columns of the head, not of `allowed`
    return np.array([group_of[column_wnids[c]] for c in picked], dtype=np.int64)


def unrestricted_right(probabilities: np.ndarray, column_wnids: list[str], groups: list[list[str]],
                       y: np.ndarray) -> np.ndarray:
    """Whether the argmax over all of the head's classes is in each row's true group."""
    picked = [column_wnids[c] for c in np.argmax(probabilities, axis=1)]
    return np.array([w in groups[t] for w, t in zip(picked, y)])


def evaluate(pipeline, column_wnids: list[str], caches: list[FeatureCache]) -> dict:
    """Each shift set's accuracy (with its bootstrap interval) of a fitted head whose probability columns are
    the classes `column_wnids`."""
    out = {}
    for c in caches:
        groups = json.loads(c.attrs["groups"])
        predicted, unrestricted = [], []
        with h5py.File(c.path, "r") as f:
            features, y = f["test/features"], f["test/labels"][...]
            for i in range(0, len(y), CHUNK):
                p = pipeline.predict_proba(features[i:i + CHUNK])
                predicted.append(restricted_predictions(p, column_wnids, groups))
                unrestricted.append(unrestricted_right(p, column_wnids, groups, y[i:i + CHUNK]))
        correct, unrestricted = np.concatenate(predicted) == y, np.concatenate(unrestricted)
        out[c.key["dataset"]] = {"test_accuracy": float(correct.mean()), "n_test": int(len(y)),
                                 # The other protocol (PR #15's): the argmax over every class the head knows.
                                 "test_accuracy_unrestricted": float(unrestricted.mean()),
                                 "n_classes": len(groups), "imagenet_classes": len({w for g in groups for w in g}),
                                 "interval": stats.intervals(y, correct, None)["test_accuracy"],
                                 "protocol": c.attrs.get("protocol", ""), "cache": str(c.path.resolve())}
    return out
