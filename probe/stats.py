"""Numbers with their uncertainty: bootstrap intervals over test images, paired comparisons of two runs
on the same test images, calibration.

The bootstrap resamples test images with replacement, as the nonparametric bootstrap does; every metric
here depends on an image only through a few discrete values (its class, whether the prediction is right,
whether the class is in the top five), so a resample is a multinomial draw over those combinations with
their observed shares, which is the same distribution as resampling the images one by one and takes
microseconds instead of seconds (tests/test_stats.py checks it against a direct resampling of images,
and the accuracy interval against scipy.stats.bootstrap). Intervals are percentile intervals of
RESAMPLES resamples, seeded, so the same predictions always give the same interval. McNemar's exact
test is scipy.stats.binomtest on the discordant pairs.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
METHOD = {"method": "percentile bootstrap over test images", "resamples": RESAMPLES, "confidence": CONFIDENCE,
          "seed": SEED}
ECE_BINS = 15


def _resampled_cells(columns: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cells [m, c], counts [resamples, m]): the distinct rows of `columns` [n, c] and, for each
    resample of the n rows with replacement, how many times each distinct row was drawn."""
    cells, counts = np.unique(columns, axis=0, return_counts=True)
    n = int(counts.sum())
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)
    return cells, draws


def _interval(values: np.ndarray) -> list[float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def interval_of_mean(values: np.ndarray, seed: int = SEED, resamples: int = RESAMPLES) -> list[float]:
    """The percentile bootstrap interval of the mean of per-item values (accuracies over seeds, a query's
    recall or AP), the items resampled with replacement; drawn in blocks of resamples, so the index
    array stays small for many items."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    block = max(1, (1 << 22) // max(1, len(values)))
    means = np.concatenate([values[rng.integers(0, len(values), (min(block, resamples - a), len(values)))].mean(1)
                            for a in range(0, resamples, block)])
    return _interval(means)


def intervals(y: np.ndarray, correct: np.ndarray, top5: np.ndarray | None, seed: int = SEED,
              resamples: int = RESAMPLES) -> dict[str, list[float]]:
    """95% intervals of test accuracy, balanced accuracy (the mean recall over the classes a resample
    holds) and, where given, top-5 accuracy, from the test images' classes `y`, whether each prediction
    is right (`correct`) and whether the class is in the top five (`top5`)."""
    y, correct = np.asarray(y, np.int64), np.asarray(correct, np.int64)
    columns = np.stack([y, correct, correct if top5 is None else np.asarray(top5, np.int64)], 1)
    cells, draws = _resampled_cells(columns, resamples, seed)
    n = draws.sum(1)
    out = {"test_accuracy": _interval(draws @ cells[:, 1] / n)}
    per_class = []
    for c in np.unique(cells[:, 0]):
        of_class = cells[:, 0] == c
        total = draws[:, of_class].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class.append(np.where(total > 0, draws[:, of_class] @ cells[of_class, 1] / total, np.nan))
    out["balanced_accuracy"] = _interval(np.nanmean(np.stack(per_class, 1), 1))
    if top5 is not None:
        out["top5_accuracy"] = _interval(draws @ cells[:, 2] / n)
    return out


def paired_difference(y: np.ndarray, correct_a: np.ndarray, correct_b: np.ndarray, seed: int = SEED,
                      resamples: int = RESAMPLES) -> dict:
    """Run A against run B on the same test images: accuracy A - B with a paired bootstrap 95% interval
    (both runs resampled with the same images) and McNemar's exact two-sided p-value."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, np.int64), np.asarray(correct_b, np.int64)
    cells, draws = _resampled_cells(np.stack([np.asarray(y, np.int64), a, b], 1), resamples, seed)
    differences = draws @ (cells[:, 1] - cells[:, 2]) / draws.sum(1)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"difference": float(a.mean() - b.mean()), "interval": _interval(differences), "only_a_right": only_a,
            "only_b_right": only_b, "mcnemar_p": p, "n": int(len(a)), **METHOD}


def calibration(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error (`bins` equal-width bins of the top-1 probability), negative
    log-likelihood of the true class (probabilities floored at 1e-12: a kNN vote share can be 0) and
    the Brier score (the squared distance to the one-hot class, summed over classes, averaged)."""
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(y, np.int64)
    rows = np.arange(len(y))
    confidence, predicted = p.max(1), p.argmax(1)
    right = (predicted == y).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(right[in_bin].mean() - confidence[in_bin].mean())
    brier = ((p ** 2).sum(1) - 2 * p[rows, y] + 1).mean()
    return {"ece": float(ece), "nll": float(-np.log(np.maximum(p[rows, y], 1e-12)).mean()), "brier": float(brier),
            "ece_bins": bins}


def reliability(confidence: np.ndarray, right: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per bin of the top-1 probability: its range, how many images, their mean confidence and accuracy."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "n": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else None,
             "accuracy": float(right[which == b].mean()) if (which == b).any() else None} for b in range(bins)]


def fit_temperature(probabilities: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimizing the negative log-likelihood of softmax(log p / T) on (probabilities,
    y): Guo et al.'s temperature scaling, applied to any head's probabilities."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-12))
    rows, y = np.arange(len(y)), np.asarray(y, np.int64)

    def nll(log_t):
        z = logp / np.exp(log_t)
        z -= z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[rows, y]).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-TEMPERATURE_BOUND, TEMPERATURE_BOUND), method="bounded").x))


TEMPERATURE_BOUND = 5.0  # log T is searched in [-5, 5]: T from 0.0067 to 148


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities of logits divided by T."""
    z = np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-12)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def confused_pairs(confusion: list[list[int]], names: list[str], top: int = 5) -> list[dict]:
    """The `top` most confused (true, predicted) pairs of a confusion matrix, by count."""
    m = np.asarray(confusion)
    off = [(int(m[i, j]), i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j]]
    return [{"true": names[i], "predicted": names[j], "count": c, "share_of_true": c / int(m[i].sum())}
            for c, i, j in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:top]]
