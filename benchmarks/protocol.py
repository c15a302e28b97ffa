"""The logreg protocol, chosen by evidence (issue 29): feature normalization, the C search, the validation
rule and the refit, over seeds and over feature sets that differ in kind, beside two references run on
the same cached features: the CLIP paper's protocol (scikit-learn's LogisticRegression, L-BFGS, on raw
features, C by bisection, refit) and CLIP_benchmark's own linear probe (clip_benchmark.metrics.linear_probe
from PyPI: AdamW, cosine schedule, weight-decay search, L2-normalized features).

    python benchmarks/protocol.py --set NAME=CACHE[@PER_CLASS][#LAYER] [--set ...]

    e.g. --set cifar=C.h5 --set cifar-10pc=C.h5@10 --set cifar-100pc=C.h5@100 --set lite0-layer=L.h5#blocks.3

Per set and seed (the seed draws the @PER_CLASS training images, as `probe fit --train-per-class
--seed`, and the validation split), for each normalization (standardize, none, l2, l2 then standardize):

- searches of C, each a walk over the CLIP paper's lattice of 97 Cs from 1e-6 to 1e6 (8 a decade):
  `grid` (probe's: 1e-4 .. 10 half a decade apart, strong to weak, stopping after 2 without a gain),
  `fine` (1e-6 .. 1e4 a quarter decade apart, stopping after a decade without a gain) and `bisection`
  (the CLIP paper's: 7 Cs two decades apart, then the interval around the peak halved to 8 a decade);
- validation rules: a stratified 20% split (`split`), or stratified 5-fold (`kfold`, on sets of at most
  --kfold-rows training rows: beyond that a 20% split holds thousands of images);
- refit on all training rows at the chosen C, or not (the split's model itself).

Each C of a (normalization, fold) problem is fitted once by probe's own solver and shared by every search
that visits it, warm-started from the nearest C already fitted (the objective is strictly convex, so the
solution does not depend on the start, to the solver's tolerance). A combination's `solver_seconds` is
the sum of the fits it needs. probe's default protocol is also run whole (`probe fit`'s pipeline) for
every normalization: its wall time, and its accuracy against the shared fits' (`default_check`).

The references run whole, each timed: scikit-learn on the first --sklearn-seeds seeds of sets of at most
--sklearn-rows training rows (its bisection takes minutes a seed on 2 cores, tens of minutes on 50,000
rows; the same objective by probe's solver is the `none / bisection / split / refit` row, every seed); CLIP_benchmark with its CLI defaults (lr 0.1,
10 epochs, batch 64) and --val_proportion 0.2's search and train+val refit, and with no search
(weight decay 0), on seed 0 only of sets over --large-rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from probe.cache import open_cache  # noqa: E402
from probe.heads import (DEFAULT_NORMALIZE, DEFAULT_VALIDATION, NORMALIZATIONS, LogisticProbe,  # noqa: E402
                         KFOLD_ROWS, _Backend, _lbfgs, _unpack, few_image_folds, normalization_steps,
                         validation_split)
from probe.selection import balanced_rows  # noqa: E402

LATTICE = np.logspace(-6, 6, 97)  # the CLIP paper's Cs: 8 a decade
SEARCHES = {"grid": (list(range(16, 57, 4)), 2), "fine": (list(range(0, 81, 2)), 4), "bisection": None}
SWEEP_TOL, REFIT_TOL, MAX_ITER = 1e-3, 1e-4, 500


class Problem:
    """Logreg at any lattice C on one training set: its accuracy on a validation set (or None) and on the
    test set, each C fitted once, warm-started from the nearest C fitted before."""

    def __init__(self, X, y, Xval, yval, Xtest, ytest, k, tol):
        self.X, self.y, self.Xval, self.yval, self.Xtest, self.ytest = X, y, Xval, yval, Xtest, ytest
        self.k, self.d, self.tol, self.backend = k, X.shape[1], tol, _Backend("cpu", np.float32)
        self.fitted: dict[int, tuple] = {}  # lattice index -> (theta, validation acc, test acc, seconds)

    def __call__(self, i: int) -> tuple:
        if i not in self.fitted:
            near = min(self.fitted, key=lambda j: abs(j - i), default=None)
            t0 = time.perf_counter()
            theta, _ = _lbfgs(lambda: iter([(self.X, self.y)]), len(self.y), self.k, self.d, float(LATTICE[i]),
                              None if near is None else self.fitted[near][0], MAX_ITER, self.tol, None, self.backend)
            seconds = time.perf_counter() - t0
            W, b = _unpack(theta, self.k, self.d)
            acc = [None if X is None else float(((X @ W.T.astype(np.float32) + b).argmax(1) == y).mean())
                   for X, y in ((self.Xval, self.yval), (self.Xtest, self.ytest))]
            self.fitted[i] = (theta, *acc, seconds)
        return self.fitted[i]


def search(name: str, score) -> tuple[int, list[int]]:
    """(the chosen lattice index, the indices visited) for a search over score(i) (higher is better; ties
    go to the first visited, the stronger regularization)."""
    if name == "bisection":  # as CLIP_benchmark's find_peak, on the CLIP paper's C range
        visited = list(range(0, 97, 16))
        peak = max(visited, key=lambda i: (score(i), -visited.index(i)))
        span = 8
        while span:
            candidates = [max(peak - span, 0), peak, min(peak + span, 96)]
            visited += candidates
            peak = max(candidates, key=lambda i: (score(i), -candidates.index(i)))
            span //= 2
        return peak, visited
    points, patience = SEARCHES[name]
    best, best_score, since, visited = None, -1.0, 0, []
    for i in points:
        visited.append(i)
        s = score(i)
        since = 0 if s > best_score else since + 1
        if s > best_score:
            best, best_score = i, s
        if since >= patience:
            break
    return best, visited


def normalized(kind: str, Xtr: np.ndarray, Xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for step in normalization_steps(kind):
        step.fit(Xtr)
        Xtr, Xte = step.transform(Xtr), step.transform(Xte)
    return Xtr.astype(np.float32), Xte.astype(np.float32)


def one_seed(X, y, Xte, yte, seed: int, kfold: bool) -> tuple[list[dict], dict]:
    """Every combination's test accuracy and solver seconds on one seed, and the whole default runs."""
    k = int(y.max()) + 1
    in_val = validation_split(y, None, 0.2, seed)
    folds = {"split": [in_val]} if in_val is not None else {}
    if kfold:
        folds["kfold"] = few_image_folds(y, None, seed)
    rows, default = [], {}
    for norm in NORMALIZATIONS:
        Xn, Xten = normalized(norm, X, Xte)
        everything = Problem(Xn, y, None, None, Xten, yte, k, REFIT_TOL)
        problems = {rule: [Problem(Xn[~m], y[~m], Xn[m], y[m], Xten, yte, k, SWEEP_TOL) for m in masks]
                    for rule, masks in folds.items()}
        for rule, ps in problems.items():
            for name in SEARCHES:
                chosen, visited = search(name, lambda i: float(np.mean([p(i)[1] for p in ps])))
                sweep_seconds = sum(p.fitted[i][3] for p in ps for i in set(visited))
                refits = [True, False] if rule == "split" else [True]
                for refit in refits:
                    acc = everything(chosen)[2] if refit else ps[0](chosen)[2]
                    rows.append({"normalize": norm, "search": name, "validation": rule, "refit": refit, "seed": seed,
                                 "C": float(LATTICE[chosen]), "test_accuracy": acc, "fits": len(set(visited)) * len(ps),
                                 "solver_seconds": sweep_seconds + (everything.fitted[chosen][3] if refit else 0.0)})
        # probe fit's pipeline, whole, with this normalization: the grid on a 20% split, refit.
        default[norm] = whole_fit(X, y, Xte, yte, seed, norm, "split")
    return rows, default


def whole_fit(X, y, Xte, yte, seed: int, normalize: str | None = None, validation: str | None = None) -> dict:
    """probe fit's own pipeline, whole and timed (None: probe's defaults)."""
    from sklearn.pipeline import make_pipeline

    t0 = time.perf_counter()
    head = LogisticProbe(random_state=seed, device="cpu", **({"validation": validation} if validation else {}))
    pipe = make_pipeline(*normalization_steps(normalize or DEFAULT_NORMALIZE), head).fit(X, y)
    return {"test_accuracy": float(pipe.score(Xte, yte)), "wall_seconds": time.perf_counter() - t0, "C": head.C_,
            "search": head.search_, "seed": seed}


def update_default(path: str) -> None:
    """Run probe's current default whole on every set and seed of an earlier result, and judge it again."""
    result = json.loads(Path(path).read_text())
    for spec, s in zip(result["settings"]["sets"], result["sets"]):
        name, _, per_class, _, X_all, y_all, Xte, yte = load_set(spec)
        classes = list(np.unique(y_all))
        runs = []
        for seed in range(s["seeds"]):
            train = balanced_rows(y_all, classes, per_class, seed, [str(c) for c in classes], "train")
            runs.append(whole_fit(X_all[train], y_all[train], Xte, yte, seed))
        s["probe_default"] = {**summarize([r["test_accuracy"] for r in runs]), "normalize": DEFAULT_NORMALIZE,
                              "validation": DEFAULT_VALIDATION,
                              "wall_seconds": float(np.mean([r["wall_seconds"] for r in runs])), "runs": runs}
        print(f"{name}: probe's default {s['probe_default']['mean']:.4f}", flush=True)
    result.update(verdict(result["sets"]))
    write_result("protocol", {k: v for k, v in result.items() if k not in ("benchmark", "created", "machine")}, path)


def clip_paper(X, y, Xte, yte, seed: int) -> dict:
    """The CLIP paper's protocol with scikit-learn itself: raw features, the C bisection on the seed's 20%
    split, refit on all training rows."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    in_val = validation_split(y, None, 0.2, seed)
    scores = {}

    def score(i):
        if i not in scores:
            m = LogisticRegression(C=float(LATTICE[i]), max_iter=1000).fit(X[~in_val], y[~in_val])
            scores[i] = float(m.score(X[in_val], y[in_val]))
        return scores[i]
    chosen, _ = search("bisection", score)
    model = LogisticRegression(C=float(LATTICE[chosen]), max_iter=1000).fit(X, y)
    return {"seed": seed, "test_accuracy": float(model.score(Xte, yte)), "C": float(LATTICE[chosen]),
            "wall_seconds": time.perf_counter() - t0, "fits": len(scores) + 1}


def clip_benchmark(X, y, Xte, yte, seed: int, search_wd: bool) -> dict:
    """CLIP_benchmark's linear probe, its own train and infer with lp.evaluate's search around them, on
    features L2-normalized as its Featurizer does; with search_wd, its --val_proportion 0.2 path (weight
    decay on the seed's split, then train+val); else its default (weight decay 0). On the CPU: its
    `.cuda()` calls are no-ops."""
    import torch
    from clip_benchmark.metrics import linear_probe as lp
    from torch.utils.data import DataLoader

    def loader(Xa, ya, shuffle=True):
        return DataLoader(lp.FeatureDataset(torch.from_numpy(Xa), torch.from_numpy(ya)), batch_size=64, shuffle=shuffle)

    Xn, Xten = normalized("l2", X, Xte)
    y64, yte64 = y.astype(np.int64), yte.astype(np.int64)
    args = dict(input_shape=X.shape[1], output_shape=int(y.max()) + 1, lr=0.1, epochs=10, amp=False, device="cpu",
                seed=seed)
    t0 = time.perf_counter()
    with _on_cpu(), contextlib.redirect_stdout(io.StringIO()):
        wd = 0.0
        if search_wd:
            in_val = validation_split(y, None, 0.2, seed)
            train, val = loader(Xn[~in_val], y64[~in_val]), loader(Xn[in_val], y64[in_val])
            wd_list = np.logspace(-6, 2, num=97).tolist()

            def find_peak(idxs):  # lp.find_peak's loop: its own accuracy() fails on NumPy 2 (float of a 1-d array)
                best_idx, max_acc = 0, 0
                for idx in idxs:
                    model = lp.train(train, args["input_shape"], args["output_shape"], wd_list[idx], args["lr"],
                                     args["epochs"], False, "cpu", seed)
                    logits, target = lp.infer(model, val, False, "cpu")
                    acc = float((logits.argmax(1) == target).float().mean())
                    if max_acc < acc:
                        best_idx, max_acc = idx, acc
                return best_idx
            peak = find_peak(list(range(0, 97, 16)))
            span = 8
            while span > 0:  # as lp.evaluate
                left, right = max(peak - span, 0), min(peak + span, len(wd_list) - 1)
                peak = find_peak([left, peak, right])
                span //= 2
            wd = wd_list[peak]
        torch.manual_seed(seed)  # the DataLoader's shuffle
        model = lp.train(loader(Xn, y64), args["input_shape"], args["output_shape"], wd, args["lr"], args["epochs"],
                         False, "cpu", seed)
        logits, target = lp.infer(model, loader(Xten, yte64, shuffle=False), False, "cpu")
    return {"seed": seed, "test_accuracy": float((logits.argmax(1) == target).float().mean()), "weight_decay": wd,
            "wall_seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _on_cpu():
    import torch

    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def load_set(spec: str):
    """NAME=CACHE[@PER_CLASS][#LAYER] -> (name, path, per_class, layer, train features, labels, test features, labels)."""
    name, _, rest = spec.partition("=")
    rest, _, layer = rest.partition("#")
    path, _, per_class = rest.partition("@")
    cache = open_cache(path)
    X, y = cache.load("train", layer or None)
    Xte, yte = cache.load("test", layer or None)
    return name, path, int(per_class) if per_class else None, layer or None, X, y, Xte, yte


def summarize(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], help="NAME=CACHE[@PER_CLASS][#LAYER]")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--large-rows", type=int, default=20000, help="sets over this many training rows get --large-seeds")
    p.add_argument("--large-seeds", type=int, default=2)
    p.add_argument("--kfold-rows", type=int, default=5000)
    p.add_argument("--sklearn-rows", type=int, default=5000)
    p.add_argument("--sklearn-seeds", type=int, default=3, help="seeds of the scikit-learn reference (minutes each)")
    p.add_argument("--after", help="a protocol.json of an earlier run whose sets come first (a run in parts, each "
                                   "with its own seeds)")
    p.add_argument("--update-default", metavar="FILE", help="only run probe's current default on the sets and seeds "
                   "of FILE (an earlier protocol.json) and judge it again")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.update_default:
        return update_default(args.update_default)
    os.environ.setdefault("TQDM_DISABLE", "1")
    earlier = json.loads(Path(args.after).read_text()) if args.after else None
    sets = list(earlier["sets"]) if earlier else []
    if earlier:
        args.set = earlier["settings"]["sets"][:len(sets)] + args.set
    t_start = time.perf_counter()
    for spec in args.set[len(sets):]:
        name, path, per_class, layer, X_all, y_all, Xte, yte = load_set(spec)
        classes = list(np.unique(y_all))
        n_rows = per_class * len(classes) if per_class else len(y_all)
        seeds = range(args.seeds if n_rows <= args.large_rows else args.large_seeds)
        rows, defaults, probe_defaults, refs = [], [], [], {"clip_paper_sklearn": [], "clip_benchmark_search": [], "clip_benchmark_default": []}
        for seed in seeds:
            train = balanced_rows(y_all, classes, per_class, seed, [str(c) for c in classes], "train")
            X, y = X_all[train], y_all[train]
            r, d = one_seed(X, y, Xte, yte, seed, kfold=len(y) <= args.kfold_rows)
            rows += r
            defaults.append(d)
            probe_defaults.append(whole_fit(X, y, Xte, yte, seed))
            if len(y) <= args.sklearn_rows and seed < args.sklearn_seeds:
                refs["clip_paper_sklearn"].append(clip_paper(X, y, Xte, yte, seed))
            if seed == 0 or n_rows <= args.large_rows:
                refs["clip_benchmark_search"].append(clip_benchmark(X, y, Xte, yte, seed, search_wd=True))
                refs["clip_benchmark_default"].append(clip_benchmark(X, y, Xte, yte, seed, search_wd=False))
            print(f"{name} seed {seed}: default {d['standardize']['test_accuracy']:.4f} "
                  f"({time.perf_counter() - t_start:.0f} s so far)", flush=True)
        combos = {}
        for r in rows:
            combos.setdefault((r["normalize"], r["search"], r["validation"], r["refit"]), []).append(r)
        table = [{"normalize": n, "search": s, "validation": v, "refit": f,
                  **summarize([r["test_accuracy"] for r in rs]),
                  "solver_seconds": float(np.mean([r["solver_seconds"] for r in rs])),
                  "fits": float(np.mean([r["fits"] for r in rs])), "C": [r["C"] for r in rs],
                  "per_seed": [r["test_accuracy"] for r in rs]}
                 for (n, s, v, f), rs in combos.items()]
        whole = {n: {**summarize([d[n]["test_accuracy"] for d in defaults]),
                     "wall_seconds": float(np.mean([d[n]["wall_seconds"] for d in defaults])),
                     # the whole run against the same combination from the shared fits (tolerances differ)
                     "largest_gap_to_shared_fits": float(max(abs(d[n]["test_accuracy"] - r["test_accuracy"])
                                                             for d, r in zip(defaults, combos[(n, "grid", "split", True)]))),
                     "per_seed": [d[n]["test_accuracy"] for d in defaults]} for n in NORMALIZATIONS}
        references = {name_: {**summarize([x["test_accuracy"] for x in xs]),
                              "wall_seconds": float(np.mean([x["wall_seconds"] for x in xs])), "runs": xs}
                      for name_, xs in refs.items() if xs}
        sets.append({"name": name, "cache": str(Path(path).name), "per_class": per_class, "layer": layer,
                     "n_train": int(n_rows), "n_test": int(len(yte)), "dim": int(X_all.shape[1]),
                     "classes": len(classes), "seeds": len(seeds), "combinations": table, "probe_fit": whole,
                     "probe_default": {**summarize([r["test_accuracy"] for r in probe_defaults]),
                                       "normalize": DEFAULT_NORMALIZE, "validation": DEFAULT_VALIDATION,
                                       "wall_seconds": float(np.mean([r["wall_seconds"] for r in probe_defaults])),
                                       "runs": probe_defaults},
                     "references": references})
        write_result("protocol", result_of(args, sets, t_start, done=len(sets) == len(args.set)), args.out)


def result_of(args, sets: list[dict], t_start: float, done: bool) -> dict:
    """The result so far (written after each set, so a long run's finished sets are never lost)."""
    seeds = {s["name"]: s["seeds"] for s in sets}
    return {"settings": {"sets": args.set, "seeds": args.seeds, "seeds_per_set": seeds, "large_rows": args.large_rows,
                           "large_seeds": args.large_seeds, "kfold_rows": args.kfold_rows,
                           "sklearn_rows": args.sklearn_rows, "sklearn_seeds": args.sklearn_seeds, "lattice": "logspace(-6, 6, 97)",
                           "searches": {"grid": "1e-4..10, 2 a decade, patience 2", "fine": "1e-6..1e4, 4 a decade, patience 4",
                                        "bisection": "CLIP paper: 7 Cs 2 decades apart, halved to 8 a decade"},
                           "sweep_tol": SWEEP_TOL, "refit_tol": REFIT_TOL,
                           "clip_benchmark": "lr 0.1, 10 epochs, batch 64, AdamW, cosine, L2-normalized features; "
                                             "search: weight decay logspace(-6, 2, 97) by find_peak, train+val refit"},
              "sets": sets, **verdict(sets), "total_seconds": time.perf_counter() - t_start, "complete": done}


def with_auto(s: dict) -> list[dict]:
    """A set's combinations and, for each k-fold one, its `auto` twin (probe's --validation auto): the k-fold
    row on a set of at most KFOLD_ROWS training rows, the split row beyond."""
    rows = list(s["combinations"])
    kfold = s["n_train"] <= KFOLD_ROWS and any(c["validation"] == "kfold" for c in rows)
    for c in s["combinations"]:
        if c["validation"] == ("kfold" if kfold else "split") and c["refit"]:
            rows.append({**c, "validation": "auto"})
    return rows


def ranking(sets: list[dict], auto: bool = True) -> list[dict]:
    """The combinations every one of `sets` has (with `auto` twins), by their mean gap to each set's best."""
    def key(c):
        return c["normalize"], c["search"], c["validation"], c["refit"]
    combos = {s["name"]: with_auto(s) if auto else s["combinations"] for s in sets}
    common = set.intersection(*({key(c) for c in combos[s["name"]]} for s in sets))
    gaps = {k: [max(c["mean"] for c in combos[s["name"]]) - next(c["mean"] for c in combos[s["name"]] if key(c) == k)
                for s in sets] for k in common}
    return [{"normalize": k[0], "search": k[1], "validation": k[2], "refit": k[3],
             "mean_gap_to_best": float(np.mean(gaps[k])), "worst_gap_to_best": float(max(gaps[k]))}
            for k in sorted(common, key=lambda k: (float(np.mean(gaps[k])), k))]


def verdict(sets: list[dict]) -> dict:
    """The combinations ranked over every set (k-fold validation runs on the smaller sets only: ranked again
    over those), and the targets for probe's default: within 0.3 points of the best reference on every
    set, at no more than a tenth of the CLIP paper protocol's wall time (on sets where scikit-learn ran)."""
    small = [s for s in sets if any(c["validation"] == "kfold" for c in s["combinations"])]
    checks = []
    for s in sets:
        default = s.get("probe_default") or s["probe_fit"][DEFAULT_NORMALIZE]
        refs = s["references"]
        best_ref = max(refs, key=lambda r: refs[r]["mean"])
        clip_wall = refs.get("clip_paper_sklearn", {}).get("wall_seconds")
        checks.append({"set": s["name"], "default": default["mean"], "best_reference": best_ref,
                       "best_reference_mean": refs[best_ref]["mean"], "gap": refs[best_ref]["mean"] - default["mean"],
                       "wall_ratio_to_clip_paper": default["wall_seconds"] / clip_wall if clip_wall else None})
    return {"ranking": ranking(sets), "ranking_kfold_sets": ranking(small, auto=False) if small and len(small) < len(sets) else None,
            "kfold_sets": [s["name"] for s in small], "default": DEFAULT_NORMALIZE, "default_validation": DEFAULT_VALIDATION,
            "checks": checks,
            "targets_met": {"within_0.3_points_of_best_reference_on_every_set": all(c["gap"] <= 0.003 for c in checks),
                            "at_most_a_tenth_of_clip_paper_wall": all(c["wall_ratio_to_clip_paper"] <= 0.1 for c in checks
                                                                      if c["wall_ratio_to_clip_paper"] is not None)}}


if __name__ == "__main__":
    main()
