"""`probe fit`: a head on cached features, saved with everything `probe predict` needs, plus metrics."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from probe import distributed
from probe.backbones import resolve, weights_identity
from probe.cache import FeatureCache, open_cache
from probe.datasets.base import OFFICIAL_TEST
from probe.device import format_bytes, resident_bytes
from probe.errors import ProbeError
from probe.extract import resolve_cache
from probe.files import atomic_write, check_space, lock, make_dir
from probe.heads import make_head, rank_classes
from probe.rows import Part, Rows, parse_bytes

HEAD_FORMAT = 1


@dataclass
class FitResult:
    out: Path  # the run folder: head.joblib and metrics.json
    metrics: dict


def find_cache(*, features: str | None = None, model: str | None = None, dataset: str = "cifar10",
               weights: str = "default", resolution: int | None = None, dtype: str = "float32",
               data_dir: str = "data", cache_dir: str = "cache", pool: str | None = None,
               layer: str | None = None, data_options: dict | None = None) -> FeatureCache:
    """The cache named by `features`, or the one `probe extract` with the same options writes (with
    `layer`: one extracted with --layers that holds it)."""
    if features is not None:
        cache = open_cache(features)
        if model is not None and cache.key["model"] != model and cache.key["model"] != resolve(model).name:
            raise ProbeError(f"{features} holds {cache.key['model']} features, not {model}; drop --model or "
                             f"run probe extract --model {model}")
        return cache
    model = model or "resnet18"
    _, key, path = resolve_cache(model=model, dataset=dataset, weights=weights, resolution=resolution, dtype=dtype,
                                 data_dir=data_dir, cache_dir=cache_dir, download=False, pool=pool,
                                 data_options=data_options)
    if layer is not None:  # the same key plus a set of layers that holds this one (for last4: the most layers)
        # A cache of these options that cannot be read is named as such, not passed over as missing.
        caches = [open_cache(c) for c in sorted(Path(cache_dir).glob(f"{path.stem.rsplit('__', 1)[0]}__L*.h5"))]
        for cache in sorted(caches, key=lambda c: -len(c.layers)) if layer == "last4" else caches:
            try:
                other = {k: v for k, v in cache.key.items() if k != "layers"}
                if other == json.loads(json.dumps(key)) and cache.layer_group(layer):
                    return cache
            except ProbeError:
                continue
        raise ProbeError(f"no cache of these options holds layer {layer!r}; run: probe extract --model {model} "
                         f"--dataset {dataset} --layers all (and the same other options)")
    if not path.exists():
        options = [f"--model {model}", f"--dataset {dataset}"]
        options += [f"--pool {pool}"] if pool else []
        options += [f"--weights {weights}"] if weights != "default" else []
        options += [f"--resolution {resolution}"] if resolution else []
        options += [f"--dtype {dtype}"] if dtype != "float32" else []
        options += [f"--cache-dir {cache_dir}"] if str(cache_dir) != "cache" else []
        raise ProbeError(f"no cached features at {path}; run: probe extract {' '.join(options)}")
    return open_cache(path)


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

    A cache without a test split (a folder with train/ only) gets one: a seeded, stratified
    `test_fraction` (default 0.2) of its training images, held out before anything else sees train.
    Labels are renumbered 0..len(classes)-1.
    """
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
        train_rows, test_rows = holdout_rows(y, keep, fraction, seed, cache.classes)
        test_source, yt, test_index = "train", y[test_rows], test_rows
        y, index = y[train_rows], train_rows
        test_split = holdout_description(fraction, len(test_rows), seed)
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
    return Rows(cache.path, parts, budget), Rows(cache.path, [test], budget, keep=False)  # the test rows: read once


def holdout_description(fraction: float, n_test: int, seed: int) -> str:
    return (f"held out of train: {fraction:g} of each class (at least one, at most all but one), "
            f"{n_test} images, stratified, seed {seed}")


def holdout_rows(labels: np.ndarray, keep: list[int], fraction: float, seed: int,
                 names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of the kept classes: a seeded stratified split, at least one of each class on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in keep:
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) < 2:
            raise ProbeError(f"class {names[c]!r} has {len(rows)} image(s): too few to hold out a test split; "
                             "add images or a test/ folder")
        n_test = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def balanced_rows(labels: np.ndarray, keep: list[int], per_class: int | None, seed: int, names: list[str],
                   source: str) -> np.ndarray:
    """Rows of the kept classes; with per_class, a seeded subset of exactly that many of each."""
    rows = np.flatnonzero(np.isin(labels, keep))
    if per_class is None:
        return rows
    if per_class < 1:
        raise ProbeError(f"--train-per-class must be positive, not {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in keep:
        of_class = rows[labels[rows] == c]
        if len(of_class) < per_class:
            raise ProbeError(f"--train-per-class {per_class}, but class {names[c]!r} has only "
                             f"{len(of_class)} training images in {source}")
        chosen.append(rng.choice(of_class, per_class, replace=False))
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


def fit(*, head: str = "logreg", features: str | None = None, model: str | None = None, dataset: str = "cifar10",
        weights: str = "default", resolution: int | None = None, dtype: str = "float32", data_dir: str = "data",
        cache_dir: str = "cache", out: str | None = None, classes: list[str] | None = None,
        train_per_class: int | None = None, seed: int = 0, C: float | None = None, k: int | None = None,
        epochs: int | None = None, device: str = "auto", runs_dir: str = "runs",
        test_fraction: float | None = None, class_weight: str | None = None, views: int | None = None,
        pool: str | None = None, layer: str | None = None, data_options: dict | None = None,
        max_memory: str | int | None = None) -> FitResult:
    """Fit head `head` on a feature cache, evaluate it on the test split, and save both under `out`.

    max_memory: bytes (or "2GB") the features may take; when the fit would need more, the head reads
    the cache a chunk at a time instead (logreg's sweep and L-BFGS summed over chunks, linear and mlp
    from a shuffle buffer, knn streaming its training rows). Under torchrun each rank reads its share
    of the rows and logreg's gradient (knn's nearest rows) are combined over ranks; rank 0 saves.
    """
    if seed < 0:  # before anything draws from default_rng(seed)
        raise ProbeError(f"--seed must be 0 or more, not {seed}")
    w = distributed.world(device)
    budget = parse_bytes(max_memory)
    if budget is not None:  # the cap is the process's: what probe and its libraries hold already counts
        held = resident_bytes()
        if budget - held < 1 << 20:
            raise ProbeError(f"--max-memory {max_memory}: this process holds {format_bytes(held)} before reading any "
                             f"features; give more than that")
        # A quarter of what is left is slack: the allocator keeps freed blocks, and the process grows a
        # little as it fits (measured: 5% over the cap without it).
        budget = (budget - held) * 3 // 4
    cache = find_cache(features=features, model=model, dataset=dataset, weights=weights, resolution=resolution,
                       dtype=dtype, data_dir=data_dir, cache_dir=cache_dir, pool=pool, layer=layer,
                       data_options=data_options)
    p = plan(cache, classes=classes, train_per_class=train_per_class, seed=seed, test_fraction=test_fraction)
    names, yt, test_split = p.names, p.yt, p.test_split
    # All stored views by default; a layer has none (views hold the final feature only).
    n_images, n_views = len(p.y), (0 if layer is not None else cache.views) if views is None else views
    if layer is not None and n_views:
        raise ProbeError("augmented views hold the final feature only: drop --views (or give 0) with --layer")
    if n_views < 0:
        raise ProbeError(f"--views must be 0 or more, not {n_views}")
    if n_views > cache.views:
        raise ProbeError(f"--views {n_views}, but {cache.path.name} holds {cache.views} view(s) of each training image")
    # The augmented views of the same training images are more rows, each image a group of n_views + 1.
    train, test = stores(cache, p, layer, n_views, budget)
    groups = train.images if n_views else None
    # In memory unless that would pass the budget: the matrix, its standardized copy and working room.
    streamed = w.size > 1 or (budget is not None and 3 * train.nbytes() + test.nbytes() > budget)
    if w.size > 1 and head not in ("logreg", "knn"):
        raise ProbeError(f"under torchrun, fit distributes logreg and knn; run --head {head} without torchrun")
    for value, what in ((C, "--C"), (epochs, "--epochs"), (k, "--k")):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ProbeError(f"{what} must be a positive finite number, not {value}")
    if class_weight is not None and head == "knn":
        raise ProbeError("--class-weight applies to logreg, linear and mlp, not knn (its votes are unweighted)")
    params = {"logreg": {"C": C, "random_state": seed, "device": device, "class_weight": class_weight},
              "knn": {"k": k, "device": device},
              "linear": {"epochs": epochs, "random_state": seed, "device": device, "class_weight": class_weight},
              "mlp": {"epochs": epochs, "random_state": seed, "device": device, "class_weight": class_weight}
              }.get(head, {})
    estimator = make_head(head, **params)
    t0 = time.perf_counter()
    try:
        if streamed:
            pipeline = _fit_streamed(estimator, head, train, groups)
        else:
            pipeline = estimator if head == "knn" else make_pipeline(StandardScaler(), estimator)  # kNN normalizes itself
            fit_params = {} if groups is None else {f"{pipeline.steps[-1][0]}__groups": groups}
            pipeline.fit(train.load(), train.labels, **fit_params)
    except ValueError as e:  # the heads raise as scikit-learn estimators do; the CLI wants one line
        raise ProbeError(f"{head} head: {str(e).strip().splitlines()[0]}") from None
    fit_seconds = time.perf_counter() - t0
    if streamed:  # every rank the same test chunks, in order (kNN combines its neighbours over ranks)
        probabilities = np.concatenate([pipeline.predict_proba(X) for X, _ in test.chunks(every_rank=True)])
    else:
        probabilities = pipeline.predict_proba(test.load())
    ranked = rank_classes(probabilities)  # the ranking predict uses: column 0 is the prediction
    predicted = pipeline.classes_[ranked[:, 0]]
    per_class = {n: float((predicted[yt == i] == i).mean()) if (yt == i).any() else None for i, n in enumerate(names)}
    key = cache.key
    metrics = {
        "kind": "fit", "method": head, "model": key["model"], "pool": key.get("pool"), "layer": layer or "final",
        "feature_dim": int(train.dim), "weights": key["weights"],
        "resolution": key["resolution"], "dataset": key["dataset"], "cache": str(cache.path),
        "classes": names, "n_train": int(n_images), "n_test": int(len(yt)), "test_split": test_split,
        "views": int(n_views), "augment": cache.key.get("augment") if n_views else None, "n_train_rows": int(len(train)),
        "streamed": streamed, "max_memory": parse_bytes(max_memory), "world_size": w.size,
        "test_accuracy": float((predicted == yt).mean()),
        # The mean recall per class, as peer benchmarks report beside top-1 (classes with test images).
        "balanced_accuracy": float(np.mean([a for a in per_class.values() if a is not None])),
        "top5_accuracy": float((pipeline.classes_[ranked[:, :5]] == yt[:, None]).any(1).mean())
        if len(names) > 5 else None,
        # A class with no test image has no accuracy: null (JSON has no NaN), and listed by name.
        "per_class_accuracy": per_class,
        "classes_without_test_images": [n for i, n in enumerate(names) if not (yt == i).any()],
        "confusion_matrix": confusion_matrix(yt, predicted, labels=range(len(names))).tolist(),
        "hyperparameters": _hyperparameters(pipeline), "train_per_class": train_per_class, "seed": seed,
        "trainable_parameters": _n_parameters(pipeline), "fit_seconds": fit_seconds, "wall_seconds": fit_seconds,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir = Path(out) if out else Path(runs_dir) / _run_name(cache, head, classes, train_per_class, seed, test_fraction,
                                                                class_weight, views, layer)
    artifact = {"format": HEAD_FORMAT, "pipeline": pipeline, "classes": names, "model": key["model"],
                "weights": weights_source(cache, weights), "weights_identity": key["weights"], "resolution": key["resolution"],
                "preprocessing": key["preprocessing"], "pool": key.get("pool"), "feature_dim": int(train.dim),
                "layers": cache.layer_group(layer) if layer else [],
                "cache": str(cache.path)}
    if w.main:  # under torchrun every rank holds the same head: rank 0 saves it
        save_run(out_dir, artifact, metrics)
    return FitResult(out_dir, metrics)


def _fit_streamed(estimator, head: str, train: Rows, groups: np.ndarray | None):
    """Fit on rows read a chunk at a time: the scaler from summed moments, then the head on scaled chunks."""
    if head == "knn":  # normalizes itself; keeps a reference to the rows, not the rows
        return estimator.fit_chunks(train, train.labels, train.dim)
    scaler = _streamed_scaler(train)

    def chunks(keep=None):
        for X, y in train.chunks(keep):
            yield scaler.transform(X), y

    def minibatches(epoch, batch_size):
        for X, y in train.minibatches(epoch, batch_size, seed=estimator.random_state):
            yield scaler.transform(X), y

    if head == "logreg":
        estimator.fit_chunks(chunks, train.labels, groups, train.dim)
    else:
        estimator.fit_chunks(minibatches, train.labels, train.dim)
    return make_pipeline(scaler, estimator)


def _streamed_scaler(train: Rows) -> StandardScaler:
    """scikit-learn's StandardScaler of all rows, from sums over chunks (and ranks) in float64."""
    moments = np.zeros((3, train.dim))  # count, sum, sum of squares
    for X, _ in train.chunks():
        moments[0] += len(X)
        moments[1] += X.sum(0, dtype=np.float64)
        moments[2] += (X * X).sum(0, dtype=np.float64)  # squares in float32, summed in float64
    moments = distributed.all_reduce(torch.from_numpy(moments)).numpy()
    n = moments[0, 0]
    scaler = StandardScaler()
    scaler.mean_ = moments[1] / n
    scaler.var_ = np.maximum(moments[2] / n - scaler.mean_ ** 2, 0.0)
    scale = np.sqrt(scaler.var_)
    scaler.scale_ = np.where(scale < 10 * np.finfo(scale.dtype).eps, 1.0, scale)  # as scikit-learn: constant columns
    scaler.n_samples_seen_, scaler.n_features_in_ = int(n), train.dim
    return scaler


def weights_source(cache: FeatureCache, weights_option: str | None = None) -> str:
    """What rebuilds the backbone of a cache's features, read from the cache, never from the command line:
    'default', 'none', or the absolute path of a file whose content has the hash in the cache's key.

    The path is the one recorded at extraction; a --weights file given now is taken instead only if
    its content has that same hash (the file was moved).
    """
    identity = cache.key["weights"]
    if identity in ("default", "none") or identity.startswith("default-"):  # default-<hash>: a saved model's own
        return identity.partition("-")[0]
    recorded = cache.attrs.get("weights_path", "")
    for candidate in (recorded, weights_option):
        if candidate and candidate not in ("default", "none") and Path(candidate).exists() \
                and weights_identity(candidate) == identity:
            return str(Path(candidate).resolve())
    raise ProbeError(f"{cache.path.name} was extracted with weights file {recorded or '(path not recorded)'} "
                     f"({identity}), which is not there with that content; give --weights PATH to that file, "
                     "so the head can rebuild its features in probe predict")


def _hyperparameters(pipeline) -> dict:
    head = pipeline[-1] if isinstance(pipeline, Pipeline) else pipeline
    hp = {k: v for k, v in head.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))}
    if hasattr(head, "C_"):
        hp["C_chosen"] = head.C_
        hp["C_from"] = "sweep" if head.sweep_ else ("--C" if head.C is not None else "default: too few samples to sweep")
        hp["sweep"] = [{"C": c, "val_accuracy": a} for c, a in head.sweep_]
        hp["n_iter"] = int(head.n_iter_)  # L-BFGS iterations of the final fit
    return hp


def _n_parameters(pipeline) -> int:
    head = pipeline[-1] if isinstance(pipeline, Pipeline) else pipeline
    if hasattr(head, "coef_"):
        return int(head.coef_.size + head.intercept_.size)
    if hasattr(head, "module_"):
        return sum(p.numel() for p in head.module_.parameters())
    return 0


def _run_name(cache: FeatureCache, head: str, classes, train_per_class, seed, test_fraction, class_weight,
              views, layer=None) -> str:
    name = f"{cache.path.stem}__{head}" + (f"__layer-{layer}" if layer else "")
    if views is not None:
        name += f"__views{views}"
    if class_weight:
        name += f"__{class_weight}"
    if test_fraction is not None:
        name += f"__test{test_fraction:g}"
    if train_per_class:
        name += f"__n{train_per_class}-seed{seed}"
    if classes:
        name += "__classes-" + hashlib.sha256(",".join(classes).encode()).hexdigest()[:6]
    return name


def save_run(out_dir: Path, artifact: dict | None, metrics: dict) -> None:
    """Write head.joblib and metrics.json, each atomically, under a lock so two writers cannot interleave."""
    make_dir(out_dir)
    head = None
    if artifact is not None:  # serialized first, so the disk check knows its size
        buffer = io.BytesIO()
        joblib.dump(artifact, buffer)
        head = buffer.getbuffer()
    text = json.dumps(metrics, indent=2, allow_nan=False).encode()
    with lock(out_dir / ".lock"):
        check_space(out_dir, len(text) + (len(head) if head is not None else 0), "head.joblib and metrics.json")
        if head is not None:
            atomic_write(out_dir / "head.joblib", head)
        atomic_write(out_dir / "metrics.json", text)


def load_head(path: str | os.PathLike) -> dict:
    """Load a head saved by `probe fit` (a pickle: load only heads from sources you trust)."""
    path = Path(path)
    if path.is_dir():
        path = path / "head.joblib"
    if not path.is_file():
        raise ProbeError(f"no head file {path}; give the head.joblib (or run folder) that probe fit wrote")
    try:
        artifact = joblib.load(path)
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise ProbeError(f"cannot load head {path} ({type(e).__name__}); it is damaged: run probe fit again") from None
    needed = ("pipeline", "classes", "model", "weights", "weights_identity", "resolution", "feature_dim")
    if not isinstance(artifact, dict) or artifact.get("format") != HEAD_FORMAT or any(k not in artifact for k in needed):
        raise ProbeError(f"{path} is not a probe head of format {HEAD_FORMAT}; run probe fit again")
    return artifact
