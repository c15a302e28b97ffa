"""The logreg protocol's choices (issue 29): `probe fit --normalize` (what the features go through before a
logreg, linear or mlp head, recorded in the identity, applied alike in memory, streamed and in probe
predict) and `--validation` (how the sweep scores each C)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from conftest import assert_one_line_error
from probe.cache import open_cache
from probe.device import resident_bytes
from probe.fit import fit
from probe.heads import DEFAULT_NORMALIZE, KFOLD_ROWS, LogisticProbe
from probe.runs import load_head


@pytest.mark.parametrize("normalize,steps", [("none", []), ("l2", [Normalizer]),
                                             ("l2+standardize", [Normalizer, StandardScaler])])
def test_each_normalization_is_the_pipeline_scikit_learn_would_build(sample_cache, tmp_path, normalize, steps):
    result = fit(features=str(sample_cache), normalize=normalize, C=0.1, out=str(tmp_path / normalize), device="cpu")
    assert result.metrics["identity"]["normalize"] == normalize
    pipeline = load_head(str(tmp_path / normalize))["pipeline"]
    assert [type(s) for _, s in pipeline.steps[:-1]] == steps
    # The same head from scikit-learn's own steps, fitted on the same rows, predicts the same test images.
    X, y = open_cache(sample_cache).load("train")
    Xt, yt = open_cache(sample_cache).load("test")
    theirs = make_pipeline(*(s() for s in steps), LogisticProbe(C=0.1, device="cpu")).fit(X, y)
    assert result.metrics["test_accuracy"] == pytest.approx(theirs.score(Xt, yt), abs=1e-9)
    assert (pipeline.predict(Xt) == theirs.predict(Xt)).all()


def test_a_streamed_fit_normalizes_as_the_in_memory_one(sample_cache, tmp_path):
    """The scaler after an L2 normalizer is fitted from moments of the normalized chunks."""
    options = dict(features=str(sample_cache), normalize="l2+standardize", device="cpu")
    in_memory = fit(**options, out=str(tmp_path / "mem")).metrics
    capped = fit(**options, out=str(tmp_path / "cap"), max_memory=resident_bytes() + (4 << 20)).metrics
    assert capped["streamed"] and not in_memory["streamed"]
    assert capped["hyperparameters"]["C_chosen"] == in_memory["hyperparameters"]["C_chosen"]
    assert capped["confusion_matrix"] == in_memory["confusion_matrix"]
    memory_scaler = load_head(str(tmp_path / "mem" / "head.json"))["pipeline"][1]
    streamed_scaler = load_head(str(tmp_path / "cap" / "head.json"))["pipeline"][1]
    np.testing.assert_allclose(streamed_scaler.mean_, memory_scaler.mean_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(streamed_scaler.scale_, memory_scaler.scale_, rtol=1e-4)


def test_the_default_normalization_is_recorded_and_folders_name_only_others(sample_cache, tmp_path):
    default = fit(features=str(sample_cache), C=0.1, runs_dir=str(tmp_path), device="cpu")
    other = fit(features=str(sample_cache), C=0.1, runs_dir=str(tmp_path), device="cpu", normalize="none")
    assert default.metrics["identity"]["normalize"] == DEFAULT_NORMALIZE
    assert default.out != other.out and "__none__" in other.out.name and f"__{DEFAULT_NORMALIZE}__" not in default.out.name


def test_normalize_errors_are_one_line(run_cli, sample_cache, tmp_path):
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "knn", "--normalize", "l2"),
                          "--normalize", "knn")
    result = run_cli("fit", "--features", sample_cache, "--normalize", "l3")
    assert result.exit_code == 2 and "l2+standardize" in result.output  # click lists the choices


@pytest.mark.parametrize("normalize", ["none", "l2+standardize"])
def test_lp_ft_starts_where_the_head_is_whatever_its_normalization(sample_cache, tmp_path, normalize):
    """The fine-tune's classifier from a head: its scaler folded into the layer, an L2 normalizer kept as a
    step before it; on the cached features it gives the head's own probabilities."""
    import torch
    from torch import nn

    from probe.finetune import _init_from_head

    names = open_cache(sample_cache).classes
    run = fit(features=str(sample_cache), normalize=normalize, C=0.1, out=str(tmp_path / normalize), device="cpu")
    fc = nn.Linear(1280, len(names))
    l2 = _init_from_head(fc, str(run.out), names)
    assert l2 == normalize.startswith("l2")
    Xt, _ = open_cache(sample_cache).load("test")
    features = torch.from_numpy(Xt)
    with torch.no_grad():
        ours = torch.softmax(fc(nn.functional.normalize(features, dim=1) if l2 else features), 1).numpy()
    head = load_head(str(run.out / "head.json"))["pipeline"]
    np.testing.assert_allclose(ours, head.predict_proba(Xt), atol=1e-4)


def test_the_validation_rule_picks_split_or_k_fold(sample_cache):
    X, y = open_cache(sample_cache).load("train")  # 1,000 rows, 100 per class
    Xs = StandardScaler().fit_transform(X)
    assert LogisticProbe(validation="split", device="cpu").fit(Xs, y).search_ == "split"
    kfold = LogisticProbe(validation="kfold", device="cpu").fit(Xs, y)
    assert kfold.search_ == "5-fold" and kfold.C_ in [c for c, _ in kfold.sweep_]
    assert LogisticProbe(validation="auto", device="cpu").fit(Xs, y).search_ == ("5-fold" if len(y) <= KFOLD_ROWS else "split")
    # Beyond KFOLD_ROWS, auto is the split: the same rows repeated past it.
    big = np.repeat(np.arange(len(y)), KFOLD_ROWS // len(y) + 1)
    assert LogisticProbe(validation="auto", device="cpu", Cs=(0.01, 0.1)).fit(Xs[big], y[big]).search_ == "split"
    with pytest.raises(ValueError, match="validation must be one of"):
        LogisticProbe(validation="loo", device="cpu").fit(Xs, y)


def test_validation_is_a_fit_option_in_the_identity(sample_cache, tmp_path, run_cli):
    split = fit(features=str(sample_cache), validation="split", runs_dir=str(tmp_path), device="cpu")
    kfold = fit(features=str(sample_cache), validation="kfold", runs_dir=str(tmp_path), device="cpu")
    assert split.metrics["identity_hash"] != kfold.metrics["identity_hash"]
    assert kfold.metrics["hyperparameters"]["C_from"] == "sweep, 5-fold validation"
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "knn", "--validation", "kfold"),
                          "--validation", "logreg")
