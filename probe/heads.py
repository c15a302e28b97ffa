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

    def _class_weights(self, y: np.ndarray, device) -> torch.Tensor | None:
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
        return torch.tensor(weights, dtype=torch.float32, device=device)

    def _encode(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)  # a continuous y: "Unknown label type"
        self.classes_, y = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has only one class ({self.classes_[0]!r}): a classifier needs at least two classes")
        return X, y

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
    """

    def __init__(self, C: float | None = None, Cs=DEFAULT_CS, val_fraction: float = 0.2, patience: int = 2,
                 max_iter: int = 500, tol: float = 1e-4, sweep_tol: float = 1e-3,
                 class_weight: str | None = None, random_state: int = 0, device: str = "auto"):
        self.C, self.Cs, self.val_fraction, self.patience, self.max_iter = C, Cs, val_fraction, patience, max_iter
        self.tol, self.sweep_tol, self.class_weight = tol, sweep_tol, class_weight
        self.random_state, self.device = random_state, device

    def fit(self, X, y, groups=None):
        """groups: rows of one group (augmented views of one image) go to the same side of the sweep's
        validation split, so no view of a validation image is trained on."""
        if self.C is not None and not (np.isfinite(self.C) and self.C > 0):
            raise ValueError(f"C must be a positive finite number, not {self.C}")
        X, y = self._encode(X, y)
        dev = resolve_device(self.device)
        k = len(self.classes_)
        group_ids, first = np.unique(groups, return_index=True) if groups is not None else (None, np.arange(len(y)))
        too_few = np.bincount(y[first]).min() < 2 or int(len(first) * self.val_fraction) < k
        if self.C is not None or too_few:  # too few samples to hold out a stratified validation split
            self.C_, self.sweep_ = float(self.C if self.C is not None else 1.0), []
            W = b = None
        else:
            tr, va = train_test_split(np.arange(len(first)), test_size=self.val_fraction, stratify=y[first],
                                      random_state=self.random_state)
            if groups is not None:  # split the groups, then take every row of each
                in_val = np.isin(groups, group_ids[va])
                tr, va = np.flatnonzero(~in_val), np.flatnonzero(in_val)
            Xt, yt = torch.from_numpy(X[tr]).to(dev), torch.from_numpy(y[tr]).to(dev)
            Xv, yv = torch.from_numpy(X[va]).to(dev), torch.from_numpy(y[va]).to(dev)
            weight = self._class_weights(y[tr], dev)
            W, b, self.sweep_, best, since_best = None, None, [], (-1.0, None, None, None), 0
            for C in sorted(self.Cs):  # strong to weak regularization: each solution warm-starts the next
                # Ranking the Cs needs less precision than the final refit: sweep_tol, not tol.
                W, b, _ = _lbfgs(Xt, yt, k, C, W, b, self.max_iter, self.sweep_tol, weight)
                correct = ((Xv @ W.T + b).argmax(1) == yv).float()
                # Balanced class weights: the sweep ranks by balanced accuracy (mean recall per class).
                accuracy = (correct.mean() if self.class_weight != "balanced" else
                            torch.stack([correct[yv == c].mean() for c in range(k) if (yv == c).any()]).mean()).item()
                self.sweep_.append((float(C), accuracy))
                since_best = since_best + 1 if accuracy <= best[0] else 0
                if accuracy > best[0]:
                    best = (accuracy, float(C), W.clone(), b.clone())
                if since_best >= self.patience:
                    break
            _, self.C_, W, b = best
        W, b, self.n_iter_ = _lbfgs(torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev), k, self.C_, W, b,
                                    self.max_iter, self.tol, self._class_weights(y, dev))
        self.coef_, self.intercept_ = W.cpu().numpy(), b.cpu().numpy()
        return self

    def _logits(self, X):
        return torch.from_numpy(X) @ torch.from_numpy(self.coef_).T + torch.from_numpy(self.intercept_)


def _lbfgs(X, y, k, C, W0, b0, max_iter, tol, weight=None):
    """Minimize mean cross-entropy + ||W||^2 / (2 C n), the scikit-learn objective divided by C n.

    weight: per-class weights of the cross-entropy, summed over the samples and divided by n (not by
    the weights' sum), so the objective stays scikit-learn's weighted one divided by C n.

    tol bounds the largest gradient entry of that mean objective. 1e-3 ranks the Cs of a sweep as
    well as 1e-4 in a third less time, but a refit warm-started from the sweep's solution can stop
    short at 1e-3 (0.3 points of test accuracy on the benchmark features), so the refit uses 1e-4.
    """
    n, d = X.shape
    W = W0.clone() if W0 is not None else torch.zeros(k, d, device=X.device)
    b = b0.clone() if b0 is not None else torch.zeros(k, device=X.device)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    rows = torch.arange(n, device=X.device)
    sample_weight = weight[y][:, None] / n if weight is not None else None

    def closure():
        # The gradient in closed form, two matrix products and no autograd graph: for softmax P,
        # d(loss)/d(logits) = (P - onehot(y)) * sample weight / n.
        logits = torch.addmm(b, X, W.T)
        log_p = logits.log_softmax(1)
        nll = -log_p[rows, y]
        G = log_p.exp_()  # log_p is not needed after this
        G[rows, y] -= 1
        G = G * sample_weight if sample_weight is not None else G.div_(n)
        loss = (nll @ sample_weight[:, 0] if sample_weight is not None else nll.mean()) + (W * W).sum() / (2 * C * n)
        W.grad = torch.addmm(W, G.T, X, alpha=1, beta=1 / (C * n))
        b.grad = G.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return W, b, max(1, opt.state[W].get("n_iter", 1))


class _TrainedHead(_TorchClassifier):
    """A torch module trained with AdamW by probe.train.train_epochs on in-memory features."""

    def _module(self, d: int, k: int) -> nn.Module:
        raise NotImplementedError

    def fit(self, X, y, groups=None):  # groups: no validation split here, nothing to keep apart
        if self.epochs < 1:
            raise ValueError(f"epochs must be positive, not {self.epochs}")
        X, y = self._encode(X, y)
        dev = resolve_device(self.device)
        gen = torch.Generator().manual_seed(self.random_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            module = self._module(X.shape[1], len(self.classes_)).to(dev)
        Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)

        def batches(epoch):
            order = torch.randperm(len(yt), generator=gen).to(dev)
            for i in range(0, len(order), self.batch_size):
                idx = order[i:i + self.batch_size]
                yield Xt[idx], yt[idx]

        # A few hundred samples make one or two batches an epoch: train at least min_steps steps in all.
        steps_per_epoch = -(-len(yt) // self.batch_size)
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

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        dev = resolve_device(self.device)
        train, labels = self.train_.to(dev), self.labels_.to(dev)
        k, n_classes = min(self.k, len(labels)), len(self.classes_)
        out = []
        with torch.inference_mode():
            for i in range(0, len(X), self.chunk):
                q = F.normalize(torch.from_numpy(X[i:i + self.chunk]).to(dev), dim=1)
                nearest = (q @ train.T).topk(k, dim=1).indices
                votes = F.one_hot(labels[nearest], n_classes).sum(1).float()
                out.append((votes / k).cpu())
        return torch.cat(out).numpy()


HEADS = {"logreg": LogisticProbe, "linear": TorchLinear, "mlp": TorchMLP, "knn": CosineKNN}


def make_head(name: str, **params) -> BaseEstimator:
    """A head by name with its parameters (None values are left at the head's default)."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ProbeError(f"unknown head {name!r}: choose one of {', '.join(HEADS)}") from None
    return cls(**{k: v for k, v in params.items() if v is not None})
