"""Heads trained on cached features, each a scikit-learn classifier (fit / predict / predict_proba /
score, classes_, clonable), so any one can stand in for another or go into a Pipeline.

- LogisticProbe (`logreg`): multinomial logistic regression with scikit-learn's objective, solved by
  full-batch L-BFGS in torch. C is picked as the published linear-probe protocols do: a log-spaced
  grid scored on a held-out 20% of the training set, warm-started from strong to weak regularization,
  then a refit on all of it.
- TorchLinear (`linear`) and TorchMLP (`mlp`): small torch heads trained with AdamW by the loop in
  probe.train.
- CosineKNN (`knn`): k-nearest neighbours by cosine similarity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from probe import distributed
from probe.device import resolve_device
from probe.errors import ProbeError
from probe.train import train_epochs

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 11))  # 1e-4 .. 10, half a decade apart


def rank_classes(probabilities: np.ndarray) -> np.ndarray:
    """Column indices of each row from most to least probable; ties keep the lower index first.

    The one ranking behind a head's predict and `probe predict`'s top-k, so the top class shown is
    always the class predicted (kNN vote shares tie often).
    """
    return np.argsort(-probabilities, axis=1, kind="stable")


class _TorchClassifier(ClassifierMixin, BaseEstimator):
    """Shared predict/predict_proba for heads whose forward pass gives logits."""

    def _class_weights(self, y: np.ndarray, device, dtype=torch.float32) -> torch.Tensor | None:
        """Per-class loss weights, as scikit-learn's class_weight: None, "balanced" (n_samples /
        (n_classes * count of the class)) or a dict {class label: weight} (others weigh 1)."""
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, dict):
            weights = np.array([self.class_weight.get(c, 1.0) for c in self.classes_.tolist()], dtype=np.float64)
        elif self.class_weight == "balanced":
            weights = len(y) / (len(self.classes_) * np.bincount(y, minlength=len(self.classes_)))
        else:
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, not {self.class_weight!r}")
        return torch.tensor(weights, dtype=dtype, device=device)

    _dtypes = np.float32  # what fit computes in (LogisticProbe: float64 too, where given)

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

    def _logits(self, X: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        with torch.inference_mode():
            return torch.softmax(self._logits(X), 1).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[rank_classes(self.predict_proba(X))[:, 0]]


class LogisticProbe(_TorchClassifier):
    """Multinomial logistic regression: minimizes C * sum(cross-entropy) + ||W||^2 / 2, as scikit-learn.

    C=None sweeps `Cs` on a stratified validation split (`val_fraction`) and refits on all data
    with the best one. Validation accuracy rises and then falls (or levels off) with C, so the sweep
    stops once `patience` grid points in a row have not beaten the best. After fit, C_ is the C used and sweep_ holds the
    (C, validation accuracy) pairs that were tried; with too few samples for a validation split
    (under 2 per class) the sweep is skipped, C_ is 1.0 (scikit-learn's default) and sweep_ is empty.
    n_iter_ is the number of L-BFGS iterations of the final fit.

    fit(X, y) holds X in memory; fit_chunks() reads the rows a chunk at a time (a cache larger than
    memory) and, under torchrun, each rank its own share, with loss and gradient summed over chunks
    and ranks: the same objective, and to solver precision the same solution. The solver works in the
    input's precision: float32 for features (probe fit), float64 where given (as scikit-learn does).
    """

    _dtypes = (np.float64, np.float32)

    def __init__(self, C: float | None = None, Cs=DEFAULT_CS, val_fraction: float = 0.2, patience: int = 2,
                 max_iter: int = 500, tol: float = 1e-4, sweep_tol: float = 1e-3,
                 class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.C, self.Cs, self.val_fraction, self.patience, self.max_iter = C, Cs, val_fraction, patience, max_iter
        self.tol, self.sweep_tol, self.class_weight = tol, sweep_tol, class_weight
        self.random_state, self.device = random_state, device

    def fit(self, X, y, groups=None):
        """groups: rows of one group (augmented views of one image) go to the same side of the sweep's
        validation split, so no view of a validation image is trained on."""
        self._check_C()
        X, y = self._encode(X, y)
        dev = resolve_device(self.device)
        Xd, yd = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)
        subsets = {}  # the sweep's train and validation rows, copied once (not at every L-BFGS step)

        def chunks(keep=None):  # in memory: the rows kept, as one chunk
            if keep is None:
                yield Xd, yd
                return
            if id(keep) not in subsets:
                rows = torch.from_numpy(np.flatnonzero(keep)).to(dev)
                subsets[id(keep)] = (keep, Xd[rows], yd[rows])  # keep itself too: its id stays its own
            yield subsets[id(keep)][1:]
        return self._fit(chunks, y, groups, X.shape[1], dev, Xd.dtype)

    def fit_chunks(self, chunks, labels: np.ndarray, groups: np.ndarray | None, n_features: int, dtype=np.float32):
        """Fit on rows read a chunk at a time: chunks(keep) yields (X [m, D] of `dtype`, y [m]) numpy chunks of
        this process's rows where the mask `keep` over all rows is true (all rows when None); labels and
        groups are of all rows, in the same order."""
        self._check_C()
        y = self._encode_labels(labels, n_features)
        dev = resolve_device(self.device)
        classes = self.classes_

        def on_device(keep=None):
            for X, yb in chunks(keep):
                yield (torch.from_numpy(X.astype(dtype, copy=False)).to(dev),
                       torch.from_numpy(np.searchsorted(classes, yb)).to(dev))
        return self._fit(on_device, y, groups, n_features, dev, torch.from_numpy(np.empty(0, dtype)).dtype)

    def _check_C(self):
        if self.C is not None and not (np.isfinite(self.C) and self.C > 0):
            raise ValueError(f"C must be a positive finite number, not {self.C}")

    def _fit(self, chunks, y: np.ndarray, groups, d: int, dev, dtype):
        k = len(self.classes_)
        group_ids, first = np.unique(groups, return_index=True) if groups is not None else (None, np.arange(len(y)))
        too_few = np.bincount(y[first]).min() < 2 or int(len(first) * self.val_fraction) < k
        if self.C is not None or too_few:  # too few samples to hold out a stratified validation split
            self.C_, self.sweep_ = float(self.C if self.C is not None else 1.0), []
            W = b = None
        else:
            _, va = train_test_split(np.arange(len(first)), test_size=self.val_fraction, stratify=y[first],
                                     random_state=self.random_state)
            if groups is not None:  # split the groups, then take every row of each
                in_val = np.isin(groups, group_ids[va])
            else:
                in_val = np.zeros(len(y), dtype=bool)
                in_val[va] = True
            in_train = ~in_val
            weight = self._class_weights(y[in_train], dev, dtype)
            W, b, self.sweep_, best, since_best = None, None, [], (-1.0, None, None, None), 0
            for C in sorted(self.Cs):  # strong to weak regularization: each solution warm-starts the next
                # Ranking the Cs needs less precision than the final refit: sweep_tol, not tol.
                W, b, _ = _lbfgs(lambda: chunks(in_train), int(in_train.sum()), k, d, C, W, b, self.max_iter,
                                 self.sweep_tol, weight, dev, dtype)
                # Per-class correct and total counts of the validation rows, over chunks and ranks.
                counts = torch.zeros(2, k, dtype=torch.float64, device=dev)
                for Xv, yv in chunks(in_val):
                    correct = (torch.addmm(b, Xv, W.T).argmax(1) == yv).double()
                    counts[0].index_add_(0, yv, correct)
                    counts[1].index_add_(0, yv, torch.ones_like(correct))
                correct, total = distributed.all_reduce(counts)
                # Balanced class weights: the sweep ranks by balanced accuracy (mean recall per class).
                accuracy = ((correct.sum() / total.sum()) if self.class_weight != "balanced" else
                            (correct[total > 0] / total[total > 0]).mean()).item()
                self.sweep_.append((float(C), accuracy))
                since_best = since_best + 1 if accuracy <= best[0] else 0
                if accuracy > best[0]:
                    best = (accuracy, float(C), W.clone(), b.clone())
                if since_best >= self.patience:
                    break
            _, self.C_, W, b = best
        W, b, self.n_iter_ = _lbfgs(lambda: chunks(None), len(y), k, d, self.C_, W, b, self.max_iter, self.tol,
                                    self._class_weights(y, dev, dtype), dev, dtype)
        self.coef_, self.intercept_ = W.cpu().numpy(), b.cpu().numpy()
        return self

    def _logits(self, X):
        W, b = (torch.from_numpy(a.astype(X.dtype, copy=False)) for a in (self.coef_, self.intercept_))
        return torch.from_numpy(X) @ W.T + b


def _lbfgs(chunks, n, k, d, C, W0, b0, max_iter, tol, weight, dev, dtype=torch.float32):
    """Minimize mean cross-entropy + ||W||^2 / (2 C n), the scikit-learn objective divided by C n, over
    the rows chunks() yields (summed over chunks, and over ranks under torchrun; n counts them all).

    weight: per-class weights of the cross-entropy, summed over the samples and divided by n (not by
    the weights' sum), so the objective stays scikit-learn's weighted one divided by C n.

    tol bounds the largest gradient entry of that mean objective. 1e-3 ranks the Cs of a sweep as
    well as 1e-4 in a third less time, but a refit warm-started from the sweep's solution can stop
    short at 1e-3 (0.3 points of test accuracy on the benchmark features), so the refit uses 1e-4.
    """
    W = W0.clone() if W0 is not None else torch.zeros(k, d, device=dev, dtype=dtype)
    b = b0.clone() if b0 is not None else torch.zeros(k, device=dev, dtype=dtype)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    sums = torch.zeros(1 + k * d + k, dtype=torch.float64, device=dev)  # loss, dW, db: one all-reduce

    def closure():
        # The gradient in closed form, two matrix products and no autograd graph: for softmax P,
        # d(loss)/d(logits) = (P - onehot(y)) * sample weight.
        loss, gW, gb = torch.zeros((), dtype=torch.float64, device=dev), torch.zeros_like(W), torch.zeros_like(b)
        for X, y in chunks():
            rows = torch.arange(len(y), device=dev)
            log_p = torch.addmm(b, X, W.T).log_softmax(1)
            nll = -log_p[rows, y]
            G = log_p.exp_()  # log_p is not needed after this
            G[rows, y] -= 1
            if weight is not None:
                G *= weight[y][:, None]
                nll = nll * weight[y]
            loss += nll.sum(dtype=torch.float64)
            gW.addmm_(G.T, X)
            gb += G.sum(0)
        sums[0], sums[1:1 + k * d], sums[1 + k * d:] = loss, gW.flatten(), gb
        distributed.all_reduce(sums)
        W.grad = sums[1:1 + k * d].view(k, d).to(W.dtype) / n + W / (C * n)
        b.grad = sums[1 + k * d:].to(b.dtype) / n
        return sums[0] / n + (W * W).sum(dtype=torch.float64) / (2 * C * n)

    with torch.no_grad():
        opt.step(closure)
    return W, b, max(1, opt.state[W].get("n_iter", 1))


class _TrainedHead(_TorchClassifier):
    """A torch module trained with AdamW by probe.train.train_epochs, on features in memory (fit) or
    read in shuffled minibatches from a larger store (fit_chunks)."""

    def _module(self, d: int, k: int) -> nn.Module:
        raise NotImplementedError

    def fit(self, X, y, groups=None):  # groups: no validation split here, nothing to keep apart
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
        y = self._encode_labels(labels, n_features)
        dev = resolve_device(self.device)
        classes = self.classes_

        def batches(epoch):
            for X, yb in minibatches(epoch, self.batch_size):
                yield torch.from_numpy(X).to(dev), torch.from_numpy(np.searchsorted(classes, yb)).to(dev)
        return self._train(batches, y, n_features, dev)

    def _train(self, batches, y: np.ndarray, d: int, dev):
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)  # dropout masks
            self.history_ = train_epochs(module, batches, optimizer=opt, scheduler=sched, epochs=self.n_epochs_,
                                         class_weight=self._class_weights(y, dev))
        self.module_ = module.eval().cpu()
        return self

    def _logits(self, X):
        return self.module_(torch.from_numpy(X))


class TorchLinear(_TrainedHead):
    """One linear layer trained with AdamW and a cosine schedule, for `epochs` or at least `min_steps` steps.

    lr 1e-2: on standardized features a linear layer at 1e-3 underfits small data sets (scikit-learn's
    check_classifiers_train: 66% after 300 steps, against 92% at 1e-2).
    """

    def __init__(self, epochs: int = 10, lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 256,
                 min_steps: int = 300, class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.min_steps, self.class_weight, self.random_state, self.device = min_steps, class_weight, random_state, device

    def _module(self, d, k):
        return nn.Linear(d, k)


class TorchMLP(_TrainedHead):
    """The tutorials' head: Linear(D, hidden) -> ReLU -> Dropout(dropout) -> Linear(hidden, classes)."""

    def __init__(self, hidden: int = 256, dropout: float = 0.3, epochs: int = 10, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 256, min_steps: int = 300,
                 class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.hidden, self.dropout = hidden, dropout
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.min_steps, self.class_weight, self.random_state, self.device = min_steps, class_weight, random_state, device

    def _module(self, d, k):
        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, k))


class CosineKNN(_TorchClassifier):
    """k-nearest neighbours on L2-normalized features; probabilities are the neighbours' vote shares."""

    def __init__(self, k: int = 20, chunk: int = 1024, device: str = "auto"):
        self.k, self.chunk, self.device = k, chunk, device

    def fit(self, X, y, groups=None):  # groups: no validation split here, nothing to keep apart
        X, y = self._encode(X, y)
        if self.k < 1:
            raise ValueError(f"k must be positive, not {self.k}")
        self.train_ = F.normalize(torch.from_numpy(X), dim=1)
        self.labels_ = torch.from_numpy(y)
        return self

    def fit_chunks(self, store, labels: np.ndarray, n_features: int):
        """Keep a reference to `store` (its chunks() yield (X, y) of the training rows, this rank's share
        under torchrun) instead of the matrix: predict_proba streams the training set a chunk at a time."""
        if self.k < 1:
            raise ValueError(f"k must be positive, not {self.k}")
        self._encode_labels(labels, n_features)
        self.store_, self.n_train_ = store, len(labels)
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        dev = resolve_device(self.device)
        k, n_classes = min(self.k, self.n_train_ if hasattr(self, "store_") else len(self.labels_)), len(self.classes_)
        out = []
        with torch.inference_mode():
            for i in range(0, len(X), self.chunk):
                q = F.normalize(torch.from_numpy(X[i:i + self.chunk]).to(dev), dim=1)
                labels = self._nearest_labels(q, k, dev)
                votes = F.one_hot(labels, n_classes).sum(1).float()
                out.append((votes / k).cpu())
        return torch.cat(out).numpy()

    def _nearest_labels(self, q: torch.Tensor, k: int, dev) -> torch.Tensor:
        """The labels (as class indices) of each query's k most similar training rows."""
        if not hasattr(self, "store_"):
            train, labels = self.train_.to(dev), self.labels_.to(dev)
            return labels[(q @ train.T).topk(k, dim=1).indices]
        # Streamed: a running top-k over the training chunks (and over ranks under torchrun).
        best_sim = torch.full((len(q), 0), -2.0, device=dev)
        best_label = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
        for X, y in self.store_.chunks():
            sims = q @ F.normalize(torch.from_numpy(X).to(dev), dim=1).T
            chunk_labels = torch.from_numpy(np.searchsorted(self.classes_, y)).to(dev).expand(len(q), -1)
            best_sim, best_label = _top(torch.cat([best_sim, sims], 1), torch.cat([best_label, chunk_labels], 1), k)
        if distributed.current().size > 1:
            gathered = distributed.all_gather((best_sim.cpu(), best_label.cpu()))
            best_sim, best_label = _top(torch.cat([s for s, _ in gathered], 1).to(dev),
                                        torch.cat([lab for _, lab in gathered], 1).to(dev), k)
        return best_label


def _top(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, at = sims.topk(min(k, sims.shape[1]), dim=1)
    return values, labels.gather(1, at)


HEADS = {"logreg": LogisticProbe, "linear": TorchLinear, "mlp": TorchMLP, "knn": CosineKNN}


def make_head(name: str, **params) -> BaseEstimator:
    """A head by name with its parameters (None values are left at the head's default)."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ProbeError(f"unknown head {name!r}: choose one of {', '.join(HEADS)}") from None
    return cls(**{k: v for k, v in params.items() if v is not None})
