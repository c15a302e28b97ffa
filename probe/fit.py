"""`probe fit`: a head on cached features, saved with everything `probe predict` needs, plus metrics.

A fit is prepared first (`prepare`: the cache found and checked, the rows planned, the head built, and
the run's identity computed from all of it), then run. The identity (probe.identity) is the cache's
key plus the head with every hyperparameter and every option of the selection; it is stored in
metrics.json and the head, ends the run folder's name, and is what `reuse=True` (probe depth, probe
suite) compares before reading a finished run back instead of fitting again.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from probe import distributed, identity, shift, zeroshot
from probe.backbones import resolve, weights_identity
from probe.cache import FeatureCache, cache_path, open_cache
from probe.device import format_bytes, resident_bytes
from probe.errors import ProbeError
from probe.keys import resolve_cache
from probe import stats
from probe.heads import (DEFAULT_NORMALIZE, TOKEN_HEADS, VAL_FRACTION, VALIDATIONS, make_head, normalization_steps,
                         rank_classes, validation_split)
from probe.rows import Part, Rows, parse_bytes
from probe.runs import HEAD_FORMAT, FitResult, folder_name, save_run  # noqa: F401  (FitResult: re-exported)
from probe.runs import finished as finished_run
from probe.selection import TEST_FRACTION, Plan, class_indices, plan, stores, test_set_identity

# Bumped when probe's fitting changes its numbers for the same options, so no earlier run is reused.
REVISION = 1
# Key fields of what a cache holds besides its features: a cache with them serves a fit without them too.
EXTRAS = ("tokens", "layers")
# Head parameters that change no number: where it runs (float32 either way), how queries are batched.
NEUTRAL_PARAMS = ("device", "chunk")


def find_cache(*, features: str | None = None, model: str | None = None, dataset: str = "cifar10",
               weights: str = "default", resolution: int | None = None, dtype: str = "float32",
               data_dir: str = "data", cache_dir: str = "cache", pool: str | None = None,
               layer: str | None = None, views: int | None = None, augment: str = "rrc", precision: str = "auto",
               compile: bool = False, device: str = "auto", data_options: dict | None = None,
               tokens: bool = False) -> FeatureCache:
    """The cache named by `features`, or the one `probe extract` with the same options writes, its stored
    key equal to theirs in every field (with `layer`: one extracted with --layers that holds it; with
    `views` N: the one extracted with --views N --augment `augment`; with `tokens`: one extracted with
    --tokens, of any --token-grid, the finest first)."""
    if features is not None:
        cache = open_cache(features)
        if model is not None and cache.key["model"] != model and cache.key["model"] != resolve(model).name:
            raise ProbeError(f"{features} holds {cache.key['model']} features, not {model}; drop --model or "
                             f"run probe extract --model {model}")
        return cache
    model = model or "resnet18"
    _, key, path = resolve_cache(model=model, dataset=dataset, weights=weights, resolution=resolution, dtype=dtype,
                                 data_dir=data_dir, cache_dir=cache_dir, download=False, pool=pool, views=views or 0,
                                 augment=augment, precision=precision, compile=compile, device=device,
                                 data_options=data_options, tokens=tokens)
    if tokens or layer is not None or not path.exists():
        # A cache extracted with --tokens or --layers holds every feature of the same options without them: the
        # one that holds what is asked (token maps, the layer), the finest grid or the most layers first.
        plain = {k: v for k, v in key.items() if k not in EXTRAS}
        stem = cache_path(cache_dir, plain).stem.rsplit("__", 1)[0]
        found = []
        for candidate in sorted(Path(cache_dir).glob(f"{stem}__*.h5")):
            cache = open_cache(candidate)  # one of these options that cannot be read is named, not passed over
            if not identity.same({k: v for k, v in cache.key.items() if k not in EXTRAS}, plain):
                continue
            try:
                if (not tokens or cache.token_shape) and (layer is None or cache.layer_group(layer)):
                    found.append(cache)
            except ProbeError:  # holds other layers
                continue
        if found:
            return max(found, key=lambda c: ((c.token_shape or (0,))[0] if tokens else 0,
                                             len(c.layers) if layer == "last4" else -len(c.layers)))
        if tokens:
            raise ProbeError(f"no cache of these options holds token maps; run: probe extract --model {model} "
                             f"--dataset {dataset} --tokens (and the same other options)")
        if layer is not None:
            raise ProbeError(f"no cache of these options holds layer {layer!r}; run: probe extract --model {model} "
                             f"--dataset {dataset} --layers all (and the same other options)")
    if not path.exists():
        options = [f"--model {model}", f"--dataset {dataset}"]
        options += [f"--pool {pool}"] if pool else []
        options += [f"--weights {weights}"] if weights != "default" else []
        options += [f"--resolution {resolution}"] if resolution else []
        options += [f"--dtype {dtype}"] if dtype != "float32" else []
        options += [f"--precision {precision}"] if precision != "auto" else []
        options += ["--compile"] if compile else []
        options += [f"--views {views} --augment {augment}"] if views else []
        options += [f"--cache-dir {cache_dir}"] if str(cache_dir) != "cache" else []
        raise ProbeError(f"no cached features at {path}; run: probe extract {' '.join(options)}")
    return open_cache(path, expect=key)


@dataclass
class Prepared:
    """Everything a fit needs, worked out before it runs, and the identity of its result."""
    cache: FeatureCache
    plan: Plan
    head: str
    estimator: object
    layer: str | None
    n_views: int
    train: Rows
    test: Rows
    streamed: bool
    identity: dict
    out: Path
    max_memory: int | None
    weights: str  # what rebuilds the backbone in probe predict (weights_source)
    calibration: Rows | None = None  # --calibrate: the held-out training images the temperature is fitted on
    evaluations: list | None = None  # --eval: the shift sets' caches the head is also scored on (probe.shift)


def fit(*, reuse: bool = False, **options) -> FitResult:
    """Fit head `head` on a feature cache, evaluate it on the test split, and save both under `out`.

    Options are prepare()'s. reuse: when the run folder already holds a finished fit of the same
    identity, read it back instead of fitting again (probe depth and probe suite do).
    """
    if options.get("head") == "seg-linear":
        return _fit_segmentation(reuse=reuse, **options)
    prepared = prepare(**options)
    if reuse:
        metrics = finished_run(prepared.out, prepared.identity)
        if metrics is not None:
            return FitResult(prepared.out, metrics, reused=True)
    return run(prepared)


SEGMENTATION_OPTIONS = ("features", "model", "dataset", "weights", "resolution", "dtype", "data_dir", "cache_dir", "out",
                        "seed", "epochs", "device", "runs_dir", "pool", "precision", "data_options", "head")


def _fit_segmentation(*, reuse: bool = False, identity_only: bool = False, head: str = "seg-linear", **options):
    """--head seg-linear (probe.segment): on a segmentation set's token cache, found as any fit finds its cache."""
    from probe import segment

    given = [k for k, v in options.items() if v is not None and k not in SEGMENTATION_OPTIONS]
    if given:
        raise ProbeError(f"--{given[0].replace('_', '-')} is not an option of --head seg-linear")
    find = {k: options[k] for k in ("features", "model", "dataset", "weights", "resolution", "dtype", "data_dir",
                                    "cache_dir", "pool", "precision", "device", "data_options") if k in options}
    cache = find_cache(**find, tokens=True)
    return segment.fit(cache, seed=options.get("seed", 0), epochs=options.get("epochs"),
                       device=options.get("device", "auto"), out=options.get("out"),
                       runs_dir=options.get("runs_dir", "runs"), weights=options.get("weights", "default"), reuse=reuse,
                       identity_only=identity_only)


def prepare(*, head: str = "logreg", features: str | None = None, model: str | None = None, dataset: str = "cifar10",
            weights: str = "default", resolution: int | None = None, dtype: str = "float32", data_dir: str = "data",
            cache_dir: str = "cache", out: str | None = None, classes: list[str] | str | None = None,
            train_per_class: int | None = None, seed: int = 0, C: float | None = None, k: int | str | None = None,
            temperature: float | None = None,
            epochs: int | None = None, device: str = "auto", runs_dir: str = "runs",
            test_fraction: float | None = None, class_weight: str | None = None, views: int | None = None,
            augment: str | None = None, precision: str = "auto", compile: bool = False,
            pool: str | None = None, layer: str | None = None, data_options: dict | None = None,
            max_memory: str | int | None = None, calibrate: str | None = None,
            normalize: str | None = None, validation: str | None = None,
            class_text: str | None = None, templates: str | None = None, init: str | None = None,
            evaluate: str | list[str] | None = None) -> Prepared:
    """Find the cache, plan the rows, build the head and compute the run's identity; nothing is fitted.

    classes: names or indices to keep (a list, or one comma-separated string). max_memory: the whole
    process's memory cap (bytes, or "2GB"); when the fit would pass it, the head reads the cache a chunk
    at a time instead (logreg's sweep and L-BFGS summed over chunks, linear and mlp from a shuffle
    buffer, knn streaming its training rows). Under torchrun each rank reads its share of the rows and
    logreg's gradient (knn's nearest rows) are combined over ranks; rank 0 saves. calibrate
    "temperature": a stratified, seeded 20% of the training images (every view of one together) is held
    out of the fit, and one temperature fitted on it scales the head's probabilities (Guo et al.).
    evaluate: shift sets ("imagenet_v2,imagenet_r" or a list) an ImageNet head is also scored on, each
    from its cache beside this one (probe.shift).
    """
    if seed < 0:  # before anything draws from default_rng(seed)
        raise ProbeError(f"--seed must be 0 or more, not {seed}")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
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
    if (head == "zeroshot" or init) and features is None and pool is None and model is not None:
        pool = resolve(model).joint_pool  # the image embedding in the text space (None: refused below)
    tokens = head in TOKEN_HEADS  # on the token maps of a cache extracted with --tokens
    if tokens and layer is not None:
        raise ProbeError(f"--head {head} reads the final token maps (probe extract --tokens); --layer is for pooled features")
    cache = find_cache(features=features, model=model, dataset=dataset, weights=weights, resolution=resolution,
                       dtype=dtype, data_dir=data_dir, cache_dir=cache_dir, pool=pool, layer=layer, views=views,
                       augment=augment or "rrc", precision=precision, compile=compile, device=device,
                       data_options=data_options, tokens=tokens)
    if cache.attrs.get("task") == "segmentation":
        raise ProbeError(f"{cache.path.name} is a segmentation set's cache: fit it with --head seg-linear")
    if "groups" in cache.attrs:
        raise ProbeError(f"{cache.key['dataset']} is a test-only shift set: score an ImageNet head on it with probe fit "
                         f"--dataset imagenet --eval {cache.key['dataset']}")
    if isinstance(evaluate, str):
        evaluate = [e.strip() for e in evaluate.split(",") if e.strip()]
    evaluations = shift.find_caches(cache, evaluate) if evaluate else None
    if evaluations:
        shift.head_wnids(cache, [0])  # an ImageNet head, or one line
    if tokens:
        cache.columns("train", "tokens")  # one line where the file holds no token maps
        layer = "tokens"
    p = plan(cache, classes=classes, train_per_class=train_per_class, seed=seed, test_fraction=test_fraction)
    if calibrate not in (None, "temperature"):
        raise ProbeError(f"unknown --calibrate {calibrate!r}: choose temperature")
    calibration = None
    if calibrate:  # the calibration images leave the plan before the head, or its sweep, sees them
        held = validation_split(p.y, None, VAL_FRACTION, seed)
        if held is None:
            raise ProbeError("--calibrate temperature holds out 20% of the training images of each class: too few "
                             "images here (it needs a held-out image of every class: about 5 training images per "
                             "class or more)")
        calibration = (p.train_rows[held], p.y[held])
        p = p._replace(train_rows=p.train_rows[~held], y=p.y[~held])
    # All stored views by default; a layer has none (views hold the final feature only).
    n_views = (0 if layer is not None else cache.views) if views is None else views
    if layer is not None and n_views:
        raise ProbeError("augmented views hold the final feature only: drop --views (or give 0) with "
                         + (f"--head {head} (token maps have no views)" if tokens else "--layer"))
    if n_views < 0:
        raise ProbeError(f"--views must be 0 or more, not {n_views}")
    if n_views > cache.views:
        raise ProbeError(f"--views {n_views}, but {cache.path.name} holds {cache.views} view(s) of each training image")
    # The augmented views of the same training images are more rows, each image a group of n_views + 1.
    train, test = stores(cache, p, layer, n_views, budget)
    # In memory unless that would pass the budget: the matrix, its standardized copy and working room.
    streamed = w.size > 1 or (budget is not None and 3 * train.nbytes() + test.nbytes() > budget)
    if w.size > 1 and head not in ("logreg", "knn"):
        raise ProbeError(f"under torchrun, fit distributes logreg and knn; run --head {head} without torchrun")
    k = _ks(k)
    for value, what in ((C, "--C"), (epochs, "--epochs"), (temperature, "--temperature"),
                        *((v, "--k") for v in (k if isinstance(k, tuple) else [k]))):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ProbeError(f"{what} must be a positive finite number, not {value}")
    if (temperature is not None or isinstance(k, tuple)) and head != "knn":
        raise ProbeError("--temperature and several --k are for --head knn")
    if normalize is not None and head in ("knn", "zeroshot"):
        raise ProbeError(f"--normalize is for logreg, linear and mlp; {head} compares L2-normalized features (cosine)")
    if normalize not in (None, "none") and tokens:
        raise ProbeError(f"--normalize is for logreg, linear and mlp; {head} layer-norms each token itself")
    normalize = None if head in ("knn", "zeroshot") else "none" if tokens else (normalize or DEFAULT_NORMALIZE)
    if normalize is not None:
        normalization_steps(normalize)  # an unknown choice: one line, before anything is read
    if class_weight is not None and head in ("knn", "zeroshot"):
        raise ProbeError(f"--class-weight applies to logreg, linear and mlp, not {head} (it is not trained by a loss)")
    if validation is not None and validation not in VALIDATIONS:
        raise ProbeError(f"--validation {validation!r}: choose one of {', '.join(VALIDATIONS)}")
    params = {"logreg": {"C": C, "random_state": seed, "device": device, "class_weight": class_weight,
                         **({"validation": validation} if validation else {})},
              "knn": {"k": k, "temperature": temperature, "random_state": seed, "device": device},
              "linear": {"epochs": epochs, "random_state": seed, "device": device, "class_weight": class_weight},
              "mlp": {"epochs": epochs, "random_state": seed, "device": device, "class_weight": class_weight},
              "attentive": {"epochs": epochs, "random_state": seed, "device": device, "class_weight": class_weight,
                            "n_tokens": cache.token_shape[0] * cache.token_shape[1] if tokens else 1},
              }.get(head, {})
    if head == "knn":  # a --k given (the default k on fewer rows: the head takes all rows but one)
        smallest = min(k) if isinstance(k, tuple) else k
        if smallest is not None and smallest >= len(train):
            raise ProbeError(f"--k {smallest}, but there are only {len(train)} training rows: with k at least the "
                             "training set every vote is the class shares, at chance; give a smaller --k")
    for option, value, heads_of in (("--C", C, ("logreg",)), ("--validation", validation, ("logreg",)), ("--k", k, ("knn",)),
                                    ("--epochs", epochs, ("linear", "mlp", "attentive")),
                                    ("--class-text", class_text, ("zeroshot",)), ("--templates", templates, ("zeroshot",)),
                                    ("--train-per-class", train_per_class, ("logreg", "linear", "mlp", "knn", "attentive"))):
        if option in ("--class-text", "--templates") and value is not None and init == "zeroshot":
            continue  # the text of --init zeroshot's prior
        if value is not None and head not in heads_of:
            extra = " (or --init zeroshot)" if option in ("--class-text", "--templates") else \
                " (zero-shot uses no training image)" if option == "--train-per-class" else ""
            raise ProbeError(f"{option} is for --head {' or '.join(heads_of)}{extra}, not {head}")
    if augment is not None and not views:
        raise ProbeError("--augment names the views of a cache extracted with --views N: give --views N too")
    held_views = (cache.key.get("augment") or {}).get("kind")
    if features is not None and augment is not None and held_views != augment:
        raise ProbeError(f"{cache.path.name} holds {held_views or 'no'} views, not {augment}")
    estimator = make_head(head, **params)
    head_params = {k: v for k, v in estimator.get_params().items() if k not in {*NEUTRAL_PARAMS, "prior", "init"}}
    if init not in (None, "zeroshot"):
        raise ProbeError(f"unknown --init {init!r}: choose zeroshot")
    if init and head not in ("logreg", "linear"):
        raise ProbeError(f"--init zeroshot is for --head logreg or linear, not {head}")
    if init and not (normalize or "").startswith("l2"):
        raise ProbeError("--init zeroshot needs --normalize l2 or l2+standardize (the zero-shot logits are a linear "
                         "function of the unit-length feature only)")
    if init and streamed:
        raise ProbeError("--init zeroshot fits in memory: drop --max-memory (or raise it)")
    text_spec = None
    if head == "zeroshot" or init:  # the text side: model, weights, class names, templates
        zeroshot.check_joint(cache.key, "--head zeroshot" if head == "zeroshot" else "--init zeroshot")
        text = dict(zip(cache.classes, zeroshot.class_names(cache.key["dataset"], cache.classes, class_text)))
        text_spec = zeroshot.text_identity(cache.key, [text[n] for n in p.names],
                                           zeroshot.templates(cache.key["dataset"], templates))
    if head == "zeroshot":  # no parameter but the text side
        head_params = {"text": text_spec}
    elif init:  # the prior's (or the start's) text, beside the head's own parameters
        head_params["init"] = {"kind": init, "text": text_spec}
    spec = {
        "artifact": "fit", "revision": REVISION, "cache": cache.key, "head": head, "params": head_params,
        # The selection, resolved: classes as the names kept, the test fraction only where one is held out.
        "classes": p.names if classes else None, "train_per_class": train_per_class, "seed": seed,
        "test_fraction": None if p.test_source == "test" else (test_fraction or TEST_FRACTION),
        "views": int(n_views), "layer": layer, "streamed": bool(streamed),
        # A streamed linear or mlp head draws its minibatches from a shuffle buffer the budget sizes.
        "max_memory": parse_bytes(max_memory) if streamed and head in ("linear", "mlp", "attentive") else None,
        "calibrate": calibrate, "normalize": normalize,
        **({"evaluate": [c.key for c in evaluations]} if evaluations else {}),  # absent: earlier runs keep theirs
    }
    spec = identity.normalized(spec)
    readable = f"{cache.path.stem}__{head}" + (f"__layer-{layer}" if layer else "") + \
        (f"__views{n_views}" if n_views else "") + (f"__n{train_per_class}" if train_per_class else "") + \
        (f"__{class_weight}" if class_weight else "") + \
        (f"__{normalize}" if normalize not in (None, DEFAULT_NORMALIZE) else "") + (f"__init-{init}" if init else "")
    out_dir = Path(out) if out else Path(runs_dir) / folder_name(readable, spec)
    calibration_rows = None
    if calibration is not None:
        calibration_rows = Rows(cache.path.resolve(), [Part(cache.columns("train", layer), None, *calibration,
                                                            np.arange(len(calibration[1])))], budget, keep=False)
    return Prepared(cache, p, head, estimator, layer, int(n_views), train, test, streamed, spec, out_dir,
                    parse_bytes(max_memory), weights_source(cache, weights), calibration_rows, evaluations)


def _ks(k: int | str | None):
    """--k as given: None, one number, or several ("10,20,100,200") as a sorted tuple."""
    if k is None or isinstance(k, int):
        return k
    try:
        ks = sorted({int(v) for v in str(k).split(",") if v.strip()})
    except ValueError:
        raise ProbeError(f"--k {k!r}: give a number of neighbours or several, such as 10,20,100,200") from None
    if not ks:
        raise ProbeError(f"--k {k!r}: give a number of neighbours or several, such as 10,20,100,200")
    return ks[0] if len(ks) == 1 else tuple(ks)


def identity_of(**options) -> dict:
    """The identity a `probe fit` with these options would record (nothing is fitted)."""
    if options.get("head") == "seg-linear":
        return _fit_segmentation(identity_only=True, **options)
    return prepare(**options).identity


def run(prep: Prepared) -> FitResult:
    """Fit the prepared head, evaluate it on the test rows, save head and metrics under prep.out."""
    w = distributed.current()
    cache, p, head, estimator, train, test = prep.cache, prep.plan, prep.head, prep.estimator, prep.train, prep.test
    names, yt = p.names, p.yt
    groups = train.images if prep.n_views else None
    t0 = time.perf_counter()
    if head == "zeroshot":  # the class embeddings from the text tower (or read back), before the clock's fit
        embeddings, scale, bias = zeroshot.class_embeddings(prep.identity["params"]["text"], prep.weights, cache.path.parent)
        estimator.set_params(class_embeddings=embeddings, logit_scale=scale, logit_bias=bias)
    init = prep.identity["params"].get("init") if head != "zeroshot" else None
    try:
        if head == "zeroshot":  # nothing is learned from the training rows: one chunk gives the width and labels
            X, y = next(iter(train.chunks()))
            pipeline = make_pipeline(estimator).fit(X, y)
        elif init:  # the normalization first, then the zero-shot weights in its space as the head's prior
            steps, X = normalization_steps(prep.identity["normalize"]), train.load()
            for step in steps:
                X = step.fit_transform(X)
            embeddings, scale, bias = zeroshot.class_embeddings(init["text"], prep.weights, cache.path.parent)
            start = zeroshot.weights_after(steps, embeddings, scale, bias)
            estimator.set_params(**{"prior" if head == "logreg" else "init": start[np.unique(train.labels)]})
            pipeline = make_pipeline(*steps, estimator.fit(X, train.labels))
        elif prep.streamed:
            pipeline = _fit_streamed(estimator, head, train, groups, prep.identity["normalize"])
        else:
            # kNN normalizes itself: a pipeline of the head alone, so every head is fitted and saved alike.
            steps = [] if head in ("knn", "zeroshot") else normalization_steps(prep.identity["normalize"])
            pipeline = make_pipeline(*steps, estimator)
            fit_params = {} if groups is None else {f"{pipeline.steps[-1][0]}__groups": groups}
            pipeline.fit(train.load(), train.labels, **fit_params)
    except ValueError as e:  # the heads raise as scikit-learn estimators do; the CLI wants one line
        raise ProbeError(f"{head} head: {str(e).strip().splitlines()[0]}") from None
    fit_seconds = time.perf_counter() - t0
    if prep.streamed:  # every rank the same test chunks, in order (kNN combines its neighbours over ranks)
        probabilities = np.concatenate([pipeline.predict_proba(X) for X, _ in test.chunks(every_rank=True)])
    else:
        probabilities = pipeline.predict_proba(test.load())
    ranked = rank_classes(probabilities)  # the ranking predict uses: column 0 is the prediction
    per_k = None
    if head == "knn" and estimator.k_sweep_:  # one search of the test rows gives every k's accuracy
        scaled = test.chunks(every_rank=True) if prep.streamed else [(test.load(), None)]
        found = [estimator.predict_proba_per_k(X) for X, _ in scaled]
        per_k = {str(k): float((pipeline.classes_[rank_classes(np.concatenate([f[k] for f in found]))[:, 0]] == yt).mean())
                 for k in found[0]}
    predicted = pipeline.classes_[ranked[:, 0]]
    per_class = {n: float((predicted[yt == i] == i).mean()) if (yt == i).any() else None for i, n in enumerate(names)}
    key, layer = cache.key, prep.layer
    # Probabilities over every kept class (a class the head never saw has probability 0), for calibration.
    full = np.zeros((len(yt), len(names)), np.float64)
    full[:, pipeline.classes_] = probabilities
    correct, top5 = predicted == yt, (pipeline.classes_[ranked[:, :5]] == yt[:, None]).any(1)
    calibrated = None
    if prep.calibration is not None:
        held = np.zeros((len(prep.calibration), len(names)))
        held[:, pipeline.classes_] = pipeline.predict_proba(prep.calibration.load())
        temperature = stats.fit_temperature(held, prep.calibration.labels)
        calibrated = {"method": "temperature scaling (one T, fitted on the held-out training images by NLL)",
                      "temperature": temperature, "n_calibration": int(len(prep.calibration)),
                      # A temperature at the edge of its search fits the held-out images badly (too few of them,
                      # or probabilities of 0 and 1 such as kNN's): said, not hidden.
                      "at_search_bound": bool(abs(abs(np.log(temperature)) - stats.TEMPERATURE_BOUND) < 1e-3),
                      "before": stats.calibration(full, yt),
                      "after": stats.calibration(stats.apply_temperature(full, temperature), yt)}
    metrics = {
        "kind": "fit", "method": head, "model": key["model"], "pool": key.get("pool"), "layer": layer or "final",
        "feature_dim": int(train.dim), "weights": key["weights"],
        "resolution": key["resolution"], "dataset": key["dataset"], "cache": str(cache.path.resolve()),
        "classes": names, "n_train": 0 if head == "zeroshot" else int(len(p.y)), "n_test": int(len(yt)), "test_split": p.test_split,
        "views": prep.n_views, "augment": (key.get("augment") or {}).get("kind") if prep.n_views else None,
        "n_train_rows": int(len(train)), "streamed": prep.streamed, "max_memory": prep.max_memory, "world_size": w.size,
        "test_accuracy": float((predicted == yt).mean()),
        # The mean recall per class, as peer benchmarks report beside top-1 (classes with test images).
        "balanced_accuracy": float(np.mean([a for a in per_class.values() if a is not None])),
        "top5_accuracy": float((pipeline.classes_[ranked[:, :5]] == yt[:, None]).any(1).mean())
        if len(names) > 5 else None,
        # A class with no test image has no accuracy: null (JSON has no NaN), and listed by name.
        # 95% intervals from a seeded bootstrap over the test images (probe.stats: method and count in the file).
        "intervals": stats.intervals(yt, correct, top5 if len(names) > 5 else None), "interval_method": stats.METHOD,
        "calibration": stats.calibration(full, yt) if calibrated is None else calibrated["after"],
        **({"temperature_scaling": calibrated} if calibrated else {}),
        "per_class_accuracy": per_class,
        **({"test_accuracy_per_k": per_k} if per_k else {}),
        "classes_without_test_images": [n for i, n in enumerate(names) if not (yt == i).any()],
        "confusion_matrix": np.bincount(yt * len(names) + predicted, minlength=len(names) ** 2)
        .reshape(len(names), len(names)).tolist(),  # rows: true class, columns: predicted
        "hyperparameters": _hyperparameters(pipeline), "train_per_class": prep.identity["train_per_class"],
        "seed": prep.identity["seed"],
        "trainable_parameters": _n_parameters(pipeline), "fit_seconds": fit_seconds, "wall_seconds": fit_seconds,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "identity": prep.identity, "identity_hash": identity.digest(prep.identity),
        "test_set": test_set(cache, p), "test_set_hash": identity.digest(test_set(cache, p)),
    }
    metrics["most_confused"] = stats.confused_pairs(metrics["confusion_matrix"], names)
    if prep.evaluations:  # the shift sets, each with the head's probabilities restricted to its classes
        known = shift.head_wnids(cache, class_indices(cache.classes, prep.identity["classes"]))
        metrics["shift"] = shift.evaluate(pipeline, [known[c] for c in pipeline.classes_], prep.evaluations)
    artifact = {"format": HEAD_FORMAT, "pipeline": pipeline, "classes": names, "model": key["model"],
                "weights": prep.weights, "weights_identity": key["weights"], "resolution": key["resolution"],
                "preprocessing": key["preprocessing"], "pool": key.get("pool"), "feature_dim": int(train.dim),
                "layers": cache.layer_group(layer) if layer not in (None, "tokens") else [],
                "tokens": {"grid": key["tokens"]["grid"], "shape": list(cache.token_shape)} if layer == "tokens" else None,
                "precision": key.get("precision", "fp32"),
                "compile": bool(key.get("compile")), "cache": str(cache.path.resolve()), "cache_key": key,
                "identity": prep.identity, "temperature": calibrated["temperature"] if calibrated else None}
    if w.main:  # under torchrun every rank holds the same head: rank 0 saves it
        if calibrated:
            full = stats.apply_temperature(full, calibrated["temperature"])
        save_run(prep.out, artifact, metrics, predictions={"rows": p.test_rows, "true": yt, "probabilities": full,
                                                           "source": p.test_source, "classes": names})
    return FitResult(prep.out, metrics)


def test_set(cache: FeatureCache, p: Plan) -> dict:
    """The identity of the test images a fit is scored on (probe.selection.test_set_identity)."""
    key = cache.key
    return test_set_identity(dataset=key["dataset"], fingerprint=key["fingerprint"], protocol=key["protocol"],
                             source=p.test_source, split=p.test_split, classes=p.names, rows=p.test_rows, labels=p.yt)


def _fit_streamed(estimator, head: str, train: Rows, groups: np.ndarray | None, normalize: str):
    """Fit on rows read a chunk at a time: a scaler from summed moments, then the head on normalized chunks."""
    if head == "knn":  # normalizes itself; keeps a reference to the rows, not the rows
        return make_pipeline(estimator.fit_chunks(train, train.labels, train.dim, groups))
    steps = normalization_steps(normalize)
    for i, step in enumerate(steps):  # a Normalizer works row by row (fitted on one row: the width); a scaler
        steps[i] = _streamed_scaler(train, steps[:i]) if isinstance(step, StandardScaler) else \
            step.fit(np.zeros((1, train.dim), np.float32))

    def transform(X):
        for step in steps:
            X = step.transform(X)
        return X

    def chunks(keep=None):
        for X, y in train.chunks(keep):
            yield transform(X), y

    def minibatches(epoch, batch_size):
        for X, y in train.minibatches(epoch, batch_size, seed=estimator.random_state):
            yield transform(X), y

    if head == "logreg":
        estimator.fit_chunks(chunks, train.labels, groups, train.dim)
    else:
        estimator.fit_chunks(minibatches, train.labels, train.dim)
    return make_pipeline(*steps, estimator)


def _streamed_scaler(train: Rows, before: list) -> StandardScaler:
    """scikit-learn's StandardScaler of all rows (after the fitted steps `before`), from sums over chunks
    (and ranks) in float64."""
    moments = np.zeros((3, train.dim))  # count, sum, sum of squares
    for X, _ in train.chunks():
        for step in before:
            X = step.transform(X)
        moments[0] += len(X)
        moments[1] += X.sum(0, dtype=np.float64)
        moments[2] += (X * X).sum(0, dtype=np.float64)  # squares in float32, summed in float64
    moments = distributed.all_reduce(moments)
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
    wanted = cache.key["weights"]
    if wanted in ("default", "none") or wanted.startswith("default-"):  # default-<hash>: a saved model's own
        return wanted.partition("-")[0]
    recorded = cache.attrs.get("weights_path", "")
    for candidate in (recorded, weights_option):
        if candidate and candidate not in ("default", "none") and Path(candidate).exists() \
                and weights_identity(candidate) == wanted:
            return str(Path(candidate).resolve())
    raise ProbeError(f"{cache.path.name} was extracted with weights file {recorded or '(path not recorded)'} "
                     f"({wanted}), which is not there with that content; give --weights PATH to that file, "
                     "so the head can rebuild its features in probe predict")


def _hyperparameters(pipeline) -> dict:
    head = pipeline[-1] if isinstance(pipeline, Pipeline) else pipeline
    hp = {k: v for k, v in head.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))}
    if hasattr(head, "k_"):
        hp["k"] = list(head.k) if isinstance(head.k, tuple) else head.k
        hp["k_chosen"] = head.k_
        hp["k_from"] = "validation" if head.k_sweep_ else "--k"
        hp["k_sweep"] = [{"k": k, "val_accuracy": a} for k, a in head.k_sweep_]
    if hasattr(head, "C_"):
        hp["C_chosen"] = head.C_
        hp["C_from"] = ("--C" if head.C is not None else "sweep" if head.search_ == "split" else
                        f"sweep, {head.search_} validation" if head.sweep_ else f"one image per class: C = {head.C_:g}")
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
