"""Each head on real features (the bundled sample through the pretrained lite0)."""

import io

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from probe.cache import open_cache
from probe.errors import ProbeError
from probe.heads import HEADS, ONE_IMAGE_C, TOKEN_HEADS, CosineKNN, LogisticProbe, TorchLinear, TorchMLP, make_head


@pytest.fixture(scope="module")
def features(sample_cache):
    cache = open_cache(sample_cache)
    (X, y), (Xt, yt) = cache.load("train"), cache.load("test")
    scaler = StandardScaler().fit(X)
    return scaler.transform(X).astype(np.float32), y, scaler.transform(Xt).astype(np.float32), yt


@pytest.mark.parametrize("name", [h for h in HEADS if h not in TOKEN_HEADS])  # those: tests/test_tokens.py
def test_each_head_beats_chance_clearly_and_round_trips(features, name, tmp_path):
    X, y, Xt, yt = features
    head = make_head(name, **({"device": "cpu"} if "device" in HEADS[name]().get_params() else {}))
    assert head.fit(X, y) is head  # zeroshot without class embeddings: each class's normalized mean
    accuracy = head.score(Xt, yt)
    assert accuracy > 0.4, accuracy  # ten classes: chance is 0.1
    proba = head.predict_proba(Xt)
    assert proba.shape == (len(yt), 10)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    buffer = io.BytesIO()
    joblib.dump(head, buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(joblib.load(buffer).predict(Xt), head.predict(Xt))
    # And through the safe head format (probe.headfile: JSON and arrays, no pickle), in a pipeline.
    from sklearn.pipeline import make_pipeline

    from probe import headfile

    text, arrays = headfile.dumps({"pipeline": make_pipeline(head)})
    (tmp_path / "head.json").write_bytes(text)
    (tmp_path / "head.npz").write_bytes(arrays)
    back = headfile.load(tmp_path)["pipeline"]
    np.testing.assert_array_equal(back.predict_proba(Xt), head.predict_proba(Xt))
    # Clonable with the same hyperparameters, like any scikit-learn estimator.
    assert clone(head).get_params() == head.get_params()


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_logreg_with_fixed_C_solves_scikit_learns_objective(features, class_weight):
    X, y, Xt, _ = features
    if class_weight:  # an imbalanced training set: every fourth image of the first five classes
        keep = (y >= 5) | (np.arange(len(y)) % 4 == 0)
        X, y = X[keep], y[keep]
    ours = LogisticProbe(C=0.05, device="cpu", tol=1e-6, class_weight=class_weight).fit(X, y)
    theirs = LogisticRegression(C=0.05, max_iter=2000, tol=1e-8, class_weight=class_weight).fit(X, y)
    weight = len(y) / (10 * np.bincount(y)) if class_weight else np.ones(10)

    def objective(W, b):  # scikit-learn's: C * sum of weighted cross-entropy + ||W||^2 / 2, in float64
        z = X.astype(np.float64) @ W.astype(np.float64).T + b
        log_p = z - z.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        return -0.05 * (log_p[np.arange(len(y)), y] * weight[y]).sum() + 0.5 * (W.astype(np.float64) ** 2).sum()

    # At least as low as scikit-learn's own solution (measured: ours lower by 2e-6 relative, balanced).
    assert objective(ours.coef_, ours.intercept_) <= objective(theirs.coef_, theirs.intercept_) * (1 + 1e-6)
    # The minimum is flat in some directions, where either solver may stop: probabilities to 5e-3.
    np.testing.assert_allclose(ours.predict_proba(Xt), theirs.predict_proba(Xt), atol=5e-3)
    assert (ours.predict(Xt) == theirs.predict(Xt)).mean() > 0.99


def test_logreg_sweep_picks_the_best_validated_C(features):
    X, y, _, _ = features
    head = LogisticProbe(device="cpu").fit(X, y)
    tried = dict(head.sweep_)
    assert head.C_ in tried and tried[head.C_] == max(tried.values())
    assert len(tried) >= 3 and list(tried) == sorted(tried)


def test_weighted_knn_is_dinov2s_rule_and_several_k_are_chosen_on_validation():
    """exp(similarity / T) votes of the k most cosine-similar rows (DINOv2's knn eval), computed directly;
    several k come from one search and the best on a validation split of the training rows is used."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 8)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.standard_normal(120) > 0).astype(int)
    Q = rng.standard_normal((15, 8)).astype(np.float32)
    knn = CosineKNN(k=7, temperature=0.07, device="cpu").fit(X, y)
    n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = n(Q) @ n(X).T
    expected = np.zeros((len(Q), 2))
    for i, row in enumerate(sims):
        top = np.argsort(-row)[:7]
        np.add.at(expected[i], y[top], np.exp(row[top] / 0.07))
    np.testing.assert_allclose(knn.predict_proba(Q), expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    several = CosineKNN(k=(1, 5, 50), temperature=0.07, device="cpu").fit(X, y)
    assert [k for k, _ in several.k_sweep_] == [1, 5, 50] and several.k_ == max(several.k_sweep_, key=lambda p: p[1])[0]
    per_k = several.predict_proba_per_k(Q)
    np.testing.assert_allclose(per_k[several.k_], several.predict_proba(Q))
    np.testing.assert_allclose(per_k[5], CosineKNN(k=5, temperature=0.07, device="cpu").fit(X, y).predict_proba(Q),
                               rtol=1e-5)


def test_knn_votes_of_its_neighbours():
    X = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]], dtype=np.float32)
    y = np.array(["a", "a", "b", "b", "b"])
    knn = CosineKNN(k=3, device="cpu").fit(X, y)
    assert knn.predict(np.array([[1, 0.05], [0, 2]], dtype=np.float32)).tolist() == ["a", "b"]
    np.testing.assert_allclose(knn.predict_proba(np.array([[1, 0.05]], dtype=np.float32)), [[2 / 3, 1 / 3]])


def test_torch_heads_are_deterministic_for_a_seed(features):
    X, y, Xt, _ = features
    a = make_head("mlp", random_state=3, epochs=2, device="cpu").fit(X, y).predict_proba(Xt)
    b = make_head("mlp", random_state=3, epochs=2, device="cpu").fit(X, y).predict_proba(Xt)
    np.testing.assert_array_equal(a, b)


def test_unknown_head_lists_the_valid_ones():
    with pytest.raises(ProbeError, match="logreg, linear, mlp, knn"):
        make_head("svm")


def test_logreg_without_enough_samples_to_validate_uses_the_one_image_C(features):
    X, y, Xt, yt = features
    rows = np.concatenate([np.flatnonzero(y == c)[:1] for c in range(10)])  # one image per class
    head = LogisticProbe(device="cpu").fit(X[rows], y[rows])
    assert head.C_ == ONE_IMAGE_C and head.sweep_ == [] and head.search_ == "one image per class"
    assert head.score(Xt, yt) > 0.1


def test_balanced_class_weights_raise_the_recall_of_a_rare_class():
    """scikit-learn's class_weight='balanced' for every head that trains. Two overlapping Gaussian
    classes, 10 to 1: unweighted, the rare class is mostly out-voted; balanced, its recall rises clearly."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (1000, 8)), rng.normal(0.8, 1, (100, 8))]).astype(np.float32)
    y = np.array([0] * 1000 + [1] * 100)
    Xt = rng.normal(0.8, 1, (500, 8)).astype(np.float32)  # rare-class test points
    for head in (LogisticProbe(device="cpu"), TorchLinear(device="cpu"), TorchMLP(device="cpu")):
        recall = {w: (head.set_params(class_weight=w).fit(X, y).predict(Xt) == 1).mean() for w in (None, "balanced")}
        assert recall["balanced"] > recall[None] + 0.3, (type(head).__name__, recall)
