"""Heads trained on cached features, each a scikit-learn classifier (fit / predict / predict_proba /
score, classes_, clonable), so any one can stand in for another or go into a Pipeline.

- LogisticProbe (`logreg`): multinomial logistic regression with scikit-learn's objective, solved by
  scipy's L-BFGS-B (the solver scikit-learn's lbfgs uses) on a closed-form gradient: numpy on the CPU,
  torch on a CUDA device. C is picked as the published linear-probe protocols do: a log-spaced grid,
  warm-started from strong to weak regularization, scored by 5-fold validation (up to 5,000 rows) or on a
  held-out 20% of the training set, then a refit on all of it (benchmarks/protocol.py: the evidence).
- TorchLinear (`linear`) and TorchMLP (`mlp`): small torch heads trained with AdamW by the loop in
  probe.train.
- CosineKNN (`knn`): k-nearest neighbours by cosine similarity; plain votes, or DINOv2's weighted
  votes (exp(similarity / T)); several k from one search, the best picked on a validation split.
- ZeroShotHead (`zeroshot`): an image-text model's zero-shot classifier, its class embeddings the text
  tower's (probe.zeroshot); no training image is used.

torch is imported only by the heads and devices that need it: a logreg fit on the CPU runs without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from probe import distributed
from probe.device import device_type, resolve_device
from probe.errors import ProbeError

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 11))  # 1e-4 .. 10, half a decade apart
VAL_FRACTION = 0.2
# C where a class has a single training image (a 1-shot episode), so no validation is possible: the grid's
# strongest regularization. On validation images of the training split (never the test split) of two lite0
# feature sets, with the default normalization, the best fixed C at k = 1 on average over both (within 0.01
# points; C moves accuracy there by 0.3 and 0.5 points over the whole grid) (benchmarks/curve.py).
ONE_IMAGE_C = 1e-4
MAX_FOLDS = 5
# How logreg's sweep scores each C: "split", a 20% validation split (k-fold where it cannot hold an image
# of every class); "kfold", stratified k-fold (k = the smallest class's count, at most MAX_FOLDS); "auto",
# k-fold up to KFOLD_ROWS training rows and the split beyond (benchmarks/protocol.py).
VALIDATIONS = ("split", "kfold", "auto")
DEFAULT_VALIDATION = "auto"
KFOLD_ROWS = 5000
# What the features go through before a logreg, linear or mlp head (`probe fit --normalize`); kNN
# normalizes itself (cosine). The default is the one benchmarks/protocol.py found best over feature sets.
NORMALIZATIONS = ("standardize", "none", "l2", "l2+standardize")
DEFAULT_NORMALIZE = "l2+standardize"


def normalization_steps(kind: str) -> list:
    """The scikit-learn steps of a --normalize choice: StandardScaler (each feature to zero mean and unit
    variance over the training rows), nothing (raw features, as the CLIP paper's probe), Normalizer (each
    row to unit L2 norm, as CLIP_benchmark), or Normalizer then StandardScaler."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    if kind not in NORMALIZATIONS:
        raise ProbeError(f"--normalize {kind!r}: choose one of {', '.join(NORMALIZATIONS)}")
    return ([Normalizer()] if kind.startswith("l2") else []) + ([StandardScaler()] if kind.endswith("standardize") else [])


def fold_scaler(W: np.ndarray, b: np.ndarray, scaler) -> tuple[np.ndarray, np.ndarray]:
    """A linear layer (W, b) after a fitted StandardScaler, as one layer on the scaler's input (float64):
    W (x - mean) / scale + b == (W / scale) x + (b - (W / scale) mean). lp-ft's start and probe export
    use it; scaler None gives the layer back."""
    W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
    if scaler is None:
        return W, b
    W = W / scaler.scale_
    return W, b - W @ scaler.mean_


def rank_classes(probabilities: np.ndarray) -> np.ndarray:
    """Column indices of each row from most to least probable; ties keep the lower index first.

    The one ranking behind a head's predict and `probe predict`'s top-k, so the top class shown is
    always the class predicted (kNN vote shares tie often).
    """
    return np.argsort(-probabilities, axis=1, kind="stable")


def validation_split(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray | None:
    """A stratified, seeded validation mask over the rows, or None when there are too few samples (under 2
    per class, or fewer validation rows than classes). groups: rows of one group (the augmented views of
    one image) go to the same side, so no view of a validation image is trained on."""
    from sklearn.model_selection import train_test_split

    group_ids, first = np.unique(groups, return_index=True) if groups is not None else (None, np.arange(len(y)))
    k = len(np.unique(y))
    if np.bincount(y[first]).min() < 2 or int(len(first) * fraction) < k:
        return None
    _, va = train_test_split(np.arange(len(first)), test_size=fraction, stratify=y[first], random_state=seed)
    if groups is not None:
        return np.isin(groups, group_ids[va])
    mask = np.zeros(len(y), dtype=bool)
    mask[va] = True
    return mask


def few_image_folds(y: np.ndarray, groups: np.ndarray | None, seed: int) -> list[np.ndarray]:
    """Stratified k-fold validation masks, k = the smallest class's image count (at most MAX_FOLDS): logreg's
    sweep on small sets, and where a 20% split is too small (fewer than 5 images of a class, as in few-shot
    episodes, where every fold holds out about one image of each class). With views, by image
    (StratifiedGroupKFold). [] when a class has one image only."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    group_ids, first = np.unique(groups, return_index=True) if groups is not None else (None, np.arange(len(y)))
    n_folds = min(MAX_FOLDS, int(np.bincount(y[first]).min()))
    if n_folds < 2:
        return []
    if groups is not None:
        splits = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(y, y, groups)
    else:
        splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    masks = []
    for _, va in splits:
        mask = np.zeros(len(y), dtype=bool)
        mask[va] = True
        masks.append(mask)
    return masks


class _Classifier(ClassifierMixin, BaseEstimator):
    """What every head shares: label encoding, class weights, predict from predict_proba."""

    _dtypes = np.float32  # what fit computes in (LogisticProbe: float64 too, where given)

    def _class_weight_array(self, y: np.ndarray) -> np.ndarray | None:
        """Per-class loss weights, as scikit-learn's class_weight: None, "balanced" (n_samples /
        (n_classes * count of the class)) or a dict {class label: weight} (others weigh 1)."""
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, dict):
            return np.array([self.class_weight.get(c, 1.0) for c in self.classes_.tolist()], dtype=np.float64)
        if self.class_weight == "balanced":
            return len(y) / (len(self.classes_) * np.bincount(y, minlength=len(self.classes_)))
        raise ValueError(f"class_weight must be None, 'balanced' or a dict, not {self.class_weight!r}")

    def _encode(self, X, y):
        X, y = validate_data(self, X, y, dtype=self._dtypes)
        return X, self._encode_labels(y)

    def _encode_labels(self, y: np.ndarray, n_features: int | None = None) -> np.ndarray:
        """classes_ from the labels and y as indices into them; n_features: set n_features_in_ (a fit whose
        rows are read later, in chunks)."""
        check_classification_targets(y)  # a continuous y: "Unknown label type"
        self.classes_, y = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has only one class ({self.classes_[0]!r}): a classifier needs at least two classes")
        if n_features is not None:
            self.n_features_in_ = n_features
        return y

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self._proba(X)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[rank_classes(self.predict_proba(X))[:, 0]]


class LogisticProbe(_Classifier):
    """Multinomial logistic regression: minimizes C * sum(cross-entropy) + ||W||^2 / 2, as scikit-learn.

    C=None sweeps `Cs` and refits on all data with the best one. `validation` says how each C is scored:
    "split", on a stratified validation split (`val_fraction`); "kfold", by stratified k-fold validation
    (k = the smallest class's count, at most 5); "auto", k-fold up to KFOLD_ROWS rows and the split
    beyond. Validation accuracy rises and then falls (or levels off) with C, so the sweep stops once
    `patience` grid points in a row have not beaten the best. Where a split would not hold an image of
    every class (fewer than about 5 per class: few-shot episodes), k-fold is used; with a single image
    of some class nothing can be validated and C_ is `one_image_C`. After fit, C_ is the C used,
    search_ how it was chosen, and sweep_ holds the (C, validation accuracy) pairs that were tried.
    n_iter_ is the number of L-BFGS iterations of the final fit. prior: None, or [n_classes, d + 1] (W0
    and b0 side by side): the penalty is then ||W - W0||^2 / 2, regularization towards W0 instead of
    towards zero, and every fit starts there (probe fit --init zeroshot: a zero-shot head's weights).

    fit(X, y) holds X in memory; fit_chunks() reads the rows a chunk at a time (a cache larger than
    memory) and, under torchrun, each rank its own share, with loss and gradient summed over chunks
    and ranks: the same objective, and to solver precision the same solution. The objective is
    evaluated in the input's precision: float32 for features (probe fit), float64 where given (as
    scikit-learn does); the solver's own arithmetic is float64.
    """

    _dtypes = (np.float64, np.float32)

    def __init__(self, C: float | None = None, Cs=DEFAULT_CS, val_fraction: float = VAL_FRACTION, patience: int = 2,
                 max_iter: int = 500, tol: float = 1e-4, sweep_tol: float = 1e-3, one_image_C: float = ONE_IMAGE_C,
                 class_weight: str | None = None, random_state: int = 0, device: str = "auto",
                 validation: str = DEFAULT_VALIDATION, prior=None):
        self.C, self.Cs, self.val_fraction, self.patience, self.max_iter = C, Cs, val_fraction, patience, max_iter
        self.validation, self.prior = validation, prior
        self.one_image_C = one_image_C
        self.tol, self.sweep_tol, self.class_weight = tol, sweep_tol, class_weight
        self.random_state, self.device = random_state, device

    def fit(self, X, y, groups=None):
        """groups: rows of one group (augmented views of one image) go to the same side of the sweep's
        validation split, so no view of a validation image is trained on."""
        self._check_C()
        X, y = self._encode(X, y)
        backend = _Backend(self.device, X.dtype)
        Xd, yd = backend.put(X), backend.put(y)
        subsets = {}  # the sweep's train and validation rows, copied once (not at every L-BFGS step)

        def chunks(keep=None):  # in memory: the rows kept, as one chunk
            if keep is None:
                yield Xd, yd
                return
            if id(keep) not in subsets:
                rows = np.flatnonzero(keep)
                subsets[id(keep)] = (keep, backend.take(Xd, rows), backend.take(yd, rows))  # keep: its id stays its own
            yield subsets[id(keep)][1:]
        return self._fit(chunks, y, groups, X.shape[1], backend)

    def fit_chunks(self, chunks, labels: np.ndarray, groups: np.ndarray | None, n_features: int, dtype=np.float32):
        """Fit on rows read a chunk at a time: chunks(keep) yields (X [m, D] of `dtype`, y [m]) numpy chunks of
        this process's rows where the mask `keep` over all rows is true (all rows when None); labels and
        groups are of all rows, in the same order."""
        self._check_C()
        y = self._encode_labels(labels, n_features)
        backend = _Backend(self.device, np.dtype(dtype))
        classes = self.classes_

        def on_device(keep=None):
            for X, yb in chunks(keep):
                yield backend.put(X.astype(dtype, copy=False)), backend.put(np.searchsorted(classes, yb))
        return self._fit(on_device, y, groups, n_features, backend)

    def _check_C(self):
        if self.C is not None and not (np.isfinite(self.C) and self.C > 0):
            raise ValueError(f"C must be a positive finite number, not {self.C}")

    def _fit(self, chunks, y: np.ndarray, groups, d: int, backend: "_Backend"):
        k = len(self.classes_)
        self._center = _prior_theta(self.prior, k, d)
        theta, self.sweep_, self.search_ = None, [], "fixed"
        if self.C is not None:
            self.C_ = float(self.C)
        else:
            if self.validation not in VALIDATIONS:
                raise ValueError(f"validation must be one of {', '.join(VALIDATIONS)}, not {self.validation!r}")
            kfold = self.validation == "kfold" or (self.validation == "auto" and len(y) <= KFOLD_ROWS)
            in_val = None if kfold else validation_split(y, groups, self.val_fraction, self.random_state)
            folds = [in_val] if in_val is not None else few_image_folds(y, groups, self.random_state)
            if not folds:  # one image of some class: nothing to validate on
                self.C_, self.search_ = float(self.one_image_C), "one image per class"
            else:
                self.search_ = "split" if in_val is not None else f"{len(folds)}-fold"
                theta = self._sweep(chunks, y, folds, k, d, backend)
        theta, self.n_iter_ = _lbfgs(lambda: chunks(None), len(y), k, d, self.C_, theta, self.max_iter, self.tol,
                                     self._class_weight_array(y), backend, self._center)
        del self._center
        W, b = _unpack(theta, k, d)
        self.coef_, self.intercept_ = W.astype(backend.dtype), b.astype(backend.dtype)
        return self

    def _sweep(self, chunks, y, folds: list[np.ndarray], k: int, d: int, backend: "_Backend"):
        """C_ and sweep_ from the validation accuracy (mean over folds) of each C, strong to weak, each
        solution warm-starting the next; stops once `patience` Cs in a row have not beaten the best. Returns
        the best C's solution of the first fold, which warm-starts the refit."""
        thetas = [None] * len(folds)
        trains = [~in_val for in_val in folds]  # made once: the in-memory fit copies each mask's rows once
        best, since_best = (-1.0, None, None), 0
        for C in sorted(self.Cs):
            accuracies = []
            for f, (in_val, in_train) in enumerate(zip(folds, trains)):
                # Ranking the Cs needs less precision than the final refit: sweep_tol, not tol.
                thetas[f], _ = _lbfgs(lambda: chunks(in_train), int(in_train.sum()), k, d, C, thetas[f], self.max_iter,
                                      self.sweep_tol, self._class_weight_array(y[in_train]), backend, self._center)
                # Per-class correct and total counts of the validation rows, over chunks and ranks.
                counts = np.zeros((2, k))
                W, b = _unpack(thetas[f], k, d)
                for Xv, yv in chunks(in_val):
                    predicted, yv = backend.argmax_logits(Xv, W, b), backend.get(yv)
                    np.add.at(counts[0], yv, predicted == yv)
                    np.add.at(counts[1], yv, 1)
                correct, total = distributed.all_reduce(counts)
                # Balanced class weights: the sweep ranks by balanced accuracy (mean recall per class).
                accuracies.append(float(correct.sum() / total.sum() if self.class_weight != "balanced" else
                                        (correct[total > 0] / total[total > 0]).mean()))
            accuracy = float(np.mean(accuracies))
            self.sweep_.append((float(C), accuracy))
            since_best = since_best + 1 if accuracy <= best[0] else 0
            if accuracy > best[0]:
                best = (accuracy, float(C), thetas[0].copy())
            if since_best >= self.patience:
                break
        _, self.C_, theta = best
        return theta

    def _proba(self, X):
        logits = X @ self.coef_.astype(X.dtype, copy=False).T + self.intercept_.astype(X.dtype, copy=False)
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)


def _prior_theta(prior, k: int, d: int) -> np.ndarray | None:
    """A prior [k, d + 1] as the solver's flat theta (W then b), or None."""
    if prior is None:
        return None
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (k, d + 1):
        raise ValueError(f"prior must be [n_classes, n_features + 1] = [{k}, {d + 1}], not {list(prior.shape)}")
    return np.concatenate([prior[:, :d].ravel(), prior[:, d]])


def _unpack(theta: np.ndarray, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return theta[:k * d].reshape(k, d), theta[k * d:]


class _Backend:
    """Where the objective of a logreg fit is evaluated: numpy on the CPU (no torch), torch on CUDA. Both
    give the loss and gradient of a chunk in the features' precision, summed in float64."""

    BLOCK_ROWS = 2048

    def __init__(self, device: str, dtype):
        self.cuda, self.dtype = device_type(device) == "cuda", np.dtype(dtype)
        if self.cuda:
            import torch

            self.torch, self.dev = torch, resolve_device(device)

    def put(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.dev) if self.cuda else a

    def get(self, a) -> np.ndarray:
        return a.cpu().numpy() if self.cuda else a

    def take(self, a, rows: np.ndarray):
        return a[self.torch.from_numpy(rows).to(self.dev)] if self.cuda else a[rows]

    def argmax_logits(self, X, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        W, b = W.astype(self.dtype), b.astype(self.dtype)
        if self.cuda:
            return self.get(self.torch.addmm(self.put(b), X, self.put(W).T).argmax(1))
        return (X @ W.T + b).argmax(1)

    def loss_grad(self, X, y, W: np.ndarray, b: np.ndarray, weight: np.ndarray | None):
        """(sum of weighted cross-entropy, its gradient in W [k, d] and b [k]) over one chunk. In closed form,
        two matrix products and no autograd graph: for softmax P, d(loss)/d(logits) = (P - onehot(y)) * weight."""
        W, b = W.astype(self.dtype), b.astype(self.dtype)
        if self.cuda:
            t = self.torch
            Wt, bt = self.put(W), self.put(b)
            rows = t.arange(len(y), device=self.dev)
            log_p = t.addmm(bt, X, Wt.T).log_softmax(1)
            nll = -log_p[rows, y]
            G = log_p.exp_()
            G[rows, y] -= 1
            if weight is not None:
                w = self.put(weight.astype(self.dtype))[y]
                G *= w[:, None]
                nll = nll * w
            return nll.sum(dtype=t.float64).item(), self.get(G.T @ X), self.get(G.sum(0))
        # Row blocks small enough that a block read for the logits is still in the CPU's cache for the
        # gradient's product (measured on 40,000 x 512: 2,048-row blocks take 0.72x the time of one pass).
        loss, gW, gb = 0.0, np.zeros_like(W), np.zeros_like(b)
        Wt = np.ascontiguousarray(W.T)
        for i in range(0, len(y), self.BLOCK_ROWS):
            Xb, yb = X[i:i + self.BLOCK_ROWS], y[i:i + self.BLOCK_ROWS]
            rows = np.arange(len(yb))
            G = Xb @ Wt  # the logits, then in place their softmax, then the gradient of the loss in them
            G += b
            G -= G.max(1, keepdims=True)
            nll = -G[rows, yb]
            np.exp(G, out=G)
            norm = G.sum(1, keepdims=True)
            nll += np.log(norm[:, 0])
            G /= norm
            G[rows, yb] -= 1
            if weight is not None:
                w = weight.astype(self.dtype)[yb]
                G *= w[:, None]
                nll *= w
            loss += float(nll.sum(dtype=np.float64))
            gW += (Xb.T @ G).T  # the product with the long axis inside, as BLAS does it fastest here
            gb += G.sum(0)
        return loss, gW, gb


def _lbfgs(chunks, n, k, d, C, theta0, max_iter, tol, weight, backend: _Backend, center=None):
    """Minimize mean cross-entropy + ||W||^2 / (2 C n), the scikit-learn objective divided by C n, over
    the rows chunks() yields (summed over chunks, and over ranks under torchrun; n counts them all),
    with scipy's L-BFGS-B from theta0 (W and b flattened; None: `center`, else zeros). Returns (theta,
    iterations). center: a prior's theta; the penalty is then ||W - W0||^2 / (2 C n).

    weight: per-class weights of the cross-entropy, summed over the samples and divided by n (not by
    the weights' sum), so the objective stays scikit-learn's weighted one divided by C n.

    tol bounds the largest gradient entry of that mean objective (scipy's gtol, as scikit-learn sets
    it). 1e-3 ranks the Cs of a sweep as well as 1e-4 in less time, but a refit warm-started from the
    sweep's solution can stop short at 1e-3, so the refit uses 1e-4.
    """
    from scipy.optimize import minimize

    theta0 = (np.zeros(k * d + k) if center is None else center.copy()) if theta0 is None else theta0
    sums = np.zeros(1 + k * d + k)  # loss, dW, db: one all-reduce per evaluation
    W0 = np.zeros(k * d) if center is None else center[:k * d]

    def objective(theta):
        W, b = _unpack(theta, k, d)
        sums[:] = 0
        for X, y in chunks():
            loss, gW, gb = backend.loss_grad(X, y, W, b, weight)
            sums[0] += loss
            sums[1:1 + k * d] += gW.ravel()
            sums[1 + k * d:] += gb
        distributed.all_reduce(sums)
        grad = sums[1:] / n
        shift = theta[:k * d] - W0
        grad[:k * d] += shift / (C * n)
        return sums[0] / n + (shift @ shift) / (2 * C * n), grad

    # A small problem gains nothing from threads, and threads that busy-wait on a busy machine cost it
    # dearly (measured: a 1,000 x 1,280 fit 100x slower beside another process): one thread for every BLAS.
    limiter = _solver_blas() if n * d >= SMALL_PROBLEM else _all_blas()
    with limiter.limit(limits=1):
        result = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxls": 50})
    return result.x, max(1, int(result.nit))


_SOLVER_BLAS = []
SMALL_PROBLEM = 1 << 24  # rows x features under which logreg's objective runs on one BLAS thread


def _all_blas():
    """Every BLAS library loaded (numpy's and scipy's)."""
    if len(_SOLVER_BLAS) < 2:
        _solver_blas()
        from threadpoolctl import ThreadpoolController

        _SOLVER_BLAS.append(ThreadpoolController().select(user_api="blas"))
    return _SOLVER_BLAS[1]


def _solver_blas():
    """The BLAS library scipy's L-BFGS-B runs on, where scipy bundles its own (pip wheels): its thread pool
    busy-waits against numpy's between the objective's matrix products (measured on 2 cores: the fit
    10x slower), and its vector operations are too small to gain from threads, so it gets one thread
    while L-BFGS-B runs; numpy's BLAS, which the objective's products use, keeps its threads. Where
    numpy and scipy share one BLAS (conda), nothing is limited."""
    if not _SOLVER_BLAS:
        import scipy
        from threadpoolctl import ThreadpoolController

        scipy_dir = Path(scipy.__file__).resolve().parent
        bundled = [scipy_dir, scipy_dir.parent / "scipy.libs"]  # where pip wheels put scipy's own OpenBLAS
        controller = ThreadpoolController()
        own = [c.filepath for c in controller.lib_controllers
               if c.user_api == "blas" and any(Path(c.filepath).resolve().is_relative_to(d) for d in bundled)]
        _SOLVER_BLAS.append(controller.select(filepath=own))
    return _SOLVER_BLAS[0]


class _TrainedHead(_Classifier):
    """A torch module trained with AdamW by probe.train.train_epochs, on features in memory (fit) or
    read in shuffled minibatches from a larger store (fit_chunks)."""

    def _module(self, d: int, k: int):
        raise NotImplementedError

    def fit(self, X, y, groups=None):  # groups: no validation split here, nothing to keep apart
        import torch

        X, y = self._encode(X, y)
        dev = resolve_device(self.device)
        gen = torch.Generator().manual_seed(self.random_state)
        Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)

        def batches(epoch):
            order = torch.randperm(len(yt), generator=gen).to(dev)
            for i in range(0, len(order), self.batch_size):
                idx = order[i:i + self.batch_size]
                yield Xt[idx], yt[idx]
        return self._train(batches, y, X.shape[1], dev)

    def fit_chunks(self, minibatches, labels: np.ndarray, n_features: int):
        """Train on minibatches(epoch, batch_size) of (X float32, y) numpy arrays, shuffled by the
        store (a shuffle buffer over chunks read in random order); labels: of all rows."""
        import torch

        y = self._encode_labels(labels, n_features)
        dev = resolve_device(self.device)
        classes = self.classes_

        def batches(epoch):
            for X, yb in minibatches(epoch, self.batch_size):
                yield torch.from_numpy(X).to(dev), torch.from_numpy(np.searchsorted(classes, yb)).to(dev)
        return self._train(batches, y, n_features, dev)

    def _train(self, batches, y: np.ndarray, d: int, dev):
        import torch

        from probe.train import train_epochs

        if self.epochs < 1:
            raise ValueError(f"epochs must be positive, not {self.epochs}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            module = self._module(d, len(self.classes_)).to(dev)
        # A few hundred samples make one or two batches an epoch: train at least min_steps steps in all.
        steps_per_epoch = -(-len(y) // self.batch_size)
        self.n_epochs_ = max(self.epochs, -(-self.min_steps // steps_per_epoch))
        opt = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.n_epochs_)
        weight = self._class_weight_array(y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)  # dropout masks
            self.history_ = train_epochs(module, batches, optimizer=opt, scheduler=sched, epochs=self.n_epochs_,
                                         diverged="check the features for values that are not finite (probe cache "
                                                  "verify), or lower the head's learning rate",
                                         class_weight=None if weight is None else
                                         torch.tensor(weight, dtype=torch.float32, device=dev))
        self.module_ = module.eval().cpu()
        return self

    def _proba(self, X):
        import torch

        with torch.inference_mode():
            return torch.softmax(self.module_(torch.from_numpy(X)), 1).numpy()


class TorchLinear(_TrainedHead):
    """One linear layer trained with AdamW and a cosine schedule, for `epochs` or at least `min_steps` steps.

    lr 1e-2: on standardized features a linear layer at 1e-3 underfits small data sets (scikit-learn's
    check_classifiers_train: 66% after 300 steps, against 92% at 1e-2).
    """

    def __init__(self, epochs: int = 10, lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 256,
                 min_steps: int = 300, class_weight: str | None = None, random_state: int = 0, device: str = "auto",
                 init=None):
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.min_steps, self.class_weight, self.random_state, self.device = min_steps, class_weight, random_state, device
        self.init = init

    def _module(self, d, k):
        """init: None, or [n_classes, d + 1] (weights and biases side by side) to start from (probe fit
        --init zeroshot: a zero-shot head's weights)."""
        import torch
        from torch import nn

        layer = nn.Linear(d, k)
        if self.init is not None:
            init = np.asarray(self.init, dtype=np.float32)
            if init.shape != (k, d + 1):
                raise ValueError(f"init must be [n_classes, n_features + 1] = [{k}, {d + 1}], not {list(init.shape)}")
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(init[:, :d]))
                layer.bias.copy_(torch.from_numpy(init[:, d]))
        return layer


class TorchMLP(_TrainedHead):
    """The tutorials' head: Linear(D, hidden) -> ReLU -> Dropout(dropout) -> Linear(hidden, classes)."""

    def __init__(self, hidden: int = 256, dropout: float = 0.3, epochs: int = 10, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 256, min_steps: int = 300,
                 class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.hidden, self.dropout = hidden, dropout
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.min_steps, self.class_weight, self.random_state, self.device = min_steps, class_weight, random_state, device

    def _module(self, d, k):
        from torch import nn

        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, k))


class AttentiveProbe(_TrainedHead):
    """An attentive probe on token maps: V-JEPA's AttentiveClassifier (facebookresearch/jepa,
    src/models/attentive_pooler.py, also AIM's and V-JEPA 2's): learned query tokens (trunc-normal, std
    0.02) attend over the layer-normed tokens in one cross-attention block (multi-head attention, a
    residual; layer norm, an MLP of mlp_ratio x the width with GELU, a residual), then a linear classifier
    on the query (the mean of the queries, where there are several).

    X is [N, n_tokens * C]: each row one image's tokens side by side, as `probe extract --tokens` stores
    them; n_tokens 1 makes it a classifier on plain features, which is what scikit-learn's checks run.
    num_heads: 16, or the largest count below that divides C. Trained as the torch heads are (AdamW,
    cosine schedule); lr 1e-3 and weight decay 0.01 are V-JEPA's evaluation defaults, 20 epochs its
    ImageNet probe's.
    """

    def __init__(self, n_tokens: int = 1, num_heads: int = 16, num_queries: int = 1, mlp_ratio: float = 4.0,
                 epochs: int = 20, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 256,
                 min_steps: int = 300, class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.n_tokens, self.num_heads, self.num_queries, self.mlp_ratio = n_tokens, num_heads, num_queries, mlp_ratio
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.min_steps, self.class_weight, self.random_state, self.device = min_steps, class_weight, random_state, device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # One token of a few features (scikit-learn's 2-feature blobs) loses its information in the layer norm
        # over the width that the recipe applies first; on token maps (hundreds of channels) it does not.
        tags.classifier_tags.poor_score = True
        return tags

    def _module(self, d, k):
        from probe.attentive import AttentivePooler

        if self.n_tokens < 1 or d % self.n_tokens:
            raise ValueError(f"{d} features are not n_tokens = {self.n_tokens} tokens of one width")
        width = d // self.n_tokens
        heads = max(h for h in range(1, max(1, self.num_heads) + 1) if width % h == 0)
        return AttentivePooler(width, self.n_tokens, heads, self.num_queries, self.mlp_ratio, k)


class SegLinearProbe(_TrainedHead):
    """DINOv2's linear segmentation probe (its BNHead, `linear` config): batch norm over the channels and
    a 1x1 convolution, which on one token is a linear layer, so the head is a classifier of tokens: rows
    [n, C], one token each, labelled with its grid cell's class (probe.segment makes them from a token
    cache, and upsamples its logits to the masks). AdamW at lr 1e-3 and weight decay 1e-4 as DINOv2's
    config, with a cosine schedule instead of its poly one; batches of 4,096 tokens.
    """

    def __init__(self, epochs: int = 10, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 4096,
                 min_steps: int = 300, class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.min_steps, self.class_weight, self.random_state, self.device = min_steps, class_weight, random_state, device

    def _module(self, d, k):
        from torch import nn

        return nn.Sequential(nn.BatchNorm1d(d), nn.Linear(d, k))


TOKEN_HEADS = ("attentive", "seg-linear")  # heads on the token maps of `probe extract --tokens`, not on pooled features


class CosineKNN(_Classifier):
    """k-nearest neighbours on L2-normalized features.

    temperature None: probabilities are the neighbours' vote shares; a temperature T: each neighbour
    votes exp(similarity / T), the weighted kNN DINOv2 and solo-learn report (T = 0.07). k: one number,
    or several (a tuple): then one search of the largest k on a stratified validation split of the
    training rows (`val_fraction`, seeded, views of one image kept together) scores every k, and the
    best is used (k_; k_sweep_ holds the (k, validation accuracy) pairs), with all rows as neighbours;
    with too few images for that split, the smallest k.
    """

    def __init__(self, k=20, temperature: float | None = None, val_fraction: float = VAL_FRACTION,
                 random_state: int = 0, chunk: int = 1024, device: str = "auto"):
        self.k, self.temperature, self.val_fraction = k, temperature, val_fraction
        self.random_state, self.chunk, self.device = random_state, chunk, device

    def _ks(self) -> list[int]:
        ks = sorted({int(k) for k in (self.k if isinstance(self.k, (tuple, list)) else [self.k])})
        if not ks or ks[0] < 1:
            raise ValueError(f"k must be positive, not {self.k}")
        if self.temperature is not None and not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, not {self.temperature}")
        return ks

    def fit(self, X, y, groups=None):
        import torch
        import torch.nn.functional as F

        ks = self._ks()
        X, y = self._encode(X, y)
        self.train_ = F.normalize(torch.from_numpy(X), dim=1)
        self.labels_ = torch.from_numpy(y)
        return self._choose_k(ks, y, groups)

    def fit_chunks(self, store, labels: np.ndarray, n_features: int, groups: np.ndarray | None = None):
        """Keep a reference to `store` (its chunks() yield (X, y) of the training rows, this rank's share
        under torchrun) instead of the matrix: predict_proba streams the training set a chunk at a time."""
        ks = self._ks()
        y = self._encode_labels(labels, n_features)
        self.store_, self.n_train_ = store, len(labels)
        return self._choose_k(ks, y, groups)

    def _choose_k(self, ks: list[int], y: np.ndarray, groups) -> "CosineKNN":
        self.k_sweep_ = []
        val = validation_split(y, groups, self.val_fraction, self.random_state) if len(ks) > 1 else None
        if val is None:  # one k, or too few images to validate several: the smallest, the safest with few images
            # A k at least the training set makes every vote the class shares: all rows but one vote.
            self.k_ = ks[0] if ks[0] < len(y) else max(1, len(y) - 1)
            return self
        # One search of the largest k for the validation rows among the other training rows; every k from it.
        queries = self._rows(val)
        probabilities = self._search(queries, max(ks), gallery=~val)
        for k in ks:
            predicted = rank_classes(probabilities[k])[:, 0]
            self.k_sweep_.append((k, float((predicted == y[val]).mean())))
        self.k_ = max(self.k_sweep_, key=lambda pair: (pair[1], -pair[0]))[0]  # ties: the smaller k
        return self

    def _rows(self, mask: np.ndarray) -> np.ndarray:
        """The training rows where `mask` is true, as float32 (from memory, or read from the store)."""
        if not hasattr(self, "store_"):
            return self.train_.numpy()[mask]
        return np.concatenate([X for X, _ in self.store_.chunks(mask, every_rank=True)])

    def _proba(self, X) -> np.ndarray:
        return self._search(X, self.k_)[self.k_]

    def predict_proba_per_k(self, X) -> dict[int, np.ndarray]:
        """{k: predict_proba at k} for every k of the head, from one search."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return {k: p for k, p in self._search(X, max(self._ks())).items() if k in self._ks()}

    def _search(self, X: np.ndarray, k_max: int, gallery: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """{k: probabilities [len(X), classes]} for every k of the head up to k_max, from one search of
        each query's k_max most similar training rows (of those where `gallery` is true)."""
        import torch
        import torch.nn.functional as F

        dev = resolve_device(self.device)
        n_gallery = int(gallery.sum()) if gallery is not None else \
            (self.n_train_ if hasattr(self, "store_") else len(self.labels_))
        k_max = min(k_max, n_gallery)
        ks = sorted({min(k, k_max) for k in self._ks() if k <= k_max} | {k_max})
        n_classes = len(self.classes_)
        out = {k: [] for k in ks}
        with torch.inference_mode():
            for i in range(0, len(X), self.chunk):
                q = F.normalize(torch.from_numpy(np.ascontiguousarray(X[i:i + self.chunk])).to(dev), dim=1)
                sims, labels = self._nearest(q, k_max, dev, gallery)
                votes = F.one_hot(labels, n_classes).float()
                if self.temperature is not None:
                    votes = votes * (sims / self.temperature).exp()[:, :, None]
                for k in ks:
                    counts = votes[:, :k].sum(1)
                    out[k].append((counts / counts.sum(1, keepdim=True)).cpu())
        result = {k: torch.cat(v).numpy() for k, v in out.items()}
        for k in self._ks():  # a k past the gallery's size is the whole gallery
            result.setdefault(k, result[k_max])
        return result

    def _nearest(self, q, k: int, dev, gallery: np.ndarray | None = None):
        """The similarities and labels (as class indices) of each query's k most similar training rows,
        most similar first (of the rows where `gallery` is true)."""
        import torch
        import torch.nn.functional as F

        if not hasattr(self, "store_"):
            train, labels = self.train_, self.labels_
            if gallery is not None:
                keep = torch.from_numpy(np.flatnonzero(gallery))
                train, labels = train[keep], labels[keep]
            sims, at = (q @ train.to(dev).T).topk(k, dim=1)
            return sims, labels.to(dev)[at]
        # Streamed: a running top-k over the training chunks (and over ranks under torchrun).
        best_sim = torch.full((len(q), 0), -2.0, device=dev)
        best_label = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
        for X, y in self.store_.chunks(gallery):
            sims = q @ F.normalize(torch.from_numpy(X).to(dev), dim=1).T
            chunk_labels = torch.from_numpy(np.searchsorted(self.classes_, y)).to(dev).expand(len(q), -1)
            best_sim, best_label = _top(torch.cat([best_sim, sims], 1), torch.cat([best_label, chunk_labels], 1), k)
        if distributed.current().size > 1:
            gathered = distributed.all_gather((best_sim.cpu(), best_label.cpu()))
            best_sim, best_label = _top(torch.cat([s for s, _ in gathered], 1).to(dev),
                                        torch.cat([lab for _, lab in gathered], 1).to(dev), k)
        return best_sim, best_label


def _top(sims, labels, k: int):
    values, at = sims.topk(min(k, sims.shape[1]), dim=1)
    return values, labels.gather(1, at)


class ZeroShotHead(_Classifier):
    """Zero-shot classification as CLIP does it: softmax over classes of
    logit_scale * cos(image embedding, class embedding) + logit_bias.

    class_embeddings: [n_classes, d], row i the embedding of class i (probe.zeroshot makes them from the
    text tower: the normalized mean of the normalized embeddings of the class name in every prompt
    template); fit takes the class labels 0..n_classes-1 and learns nothing from X but its width, and
    classes_ is every class, seen in y or not. With class_embeddings None, the class embeddings are the
    normalized means of each class's normalized training rows (the image-side prototype), which is what
    scikit-learn's estimator checks run on. logit_bias (SigLIP's) shifts every logit alike: it changes
    no prediction and no softmax probability, and is kept so the logits are the model's own.
    """

    def __init__(self, class_embeddings=None, logit_scale: float = 100.0, logit_bias: float = 0.0):
        self.class_embeddings, self.logit_scale, self.logit_bias = class_embeddings, logit_scale, logit_bias

    def fit(self, X, y):
        if not (np.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive number, not {self.logit_scale}")
        if self.class_embeddings is None:
            X, y = self._encode(X, y)
            X = _unit_rows(X)
            weights = np.stack([X[y == c].mean(0) for c in range(len(self.classes_))])
        else:
            X, y = validate_data(self, X, y, dtype=np.float32)
            check_classification_targets(y)
            weights = np.asarray(self.class_embeddings, dtype=np.float32)
            if weights.ndim != 2 or weights.shape[1] != X.shape[1]:
                raise ValueError(f"the class embeddings are {weights.shape[-1]}-d and the features {X.shape[1]}-d: "
                                 "these features are not in this text tower's embedding space")
            labels = np.unique(y)
            if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(weights):
                raise ValueError(f"the labels must be class indices 0..{len(weights) - 1}, one per class embedding")
            self.classes_ = np.arange(len(weights))
        self.weights_ = _unit_rows(weights)
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        # float64: a float32 product's rounding depends on the batch (BLAS blocking), times a scale of 100
        cosine = _unit_rows(X.astype(np.float64)) @ self.weights_.T.astype(np.float64)
        return softmax(self.logit_scale * cosine + self.logit_bias, axis=1)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1)


HEADS = {"logreg": LogisticProbe, "linear": TorchLinear, "mlp": TorchMLP, "knn": CosineKNN, "zeroshot": ZeroShotHead,
         "attentive": AttentiveProbe, "seg-linear": SegLinearProbe}


def make_head(name: str, **params) -> BaseEstimator:
    """A head by name with its parameters (None values are left at the head's default)."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ProbeError(f"unknown head {name!r}: choose one of {', '.join(HEADS)}") from None
    return cls(**{k: v for k, v in params.items() if v is not None})
