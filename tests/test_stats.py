"""Numbers with error bars (issue 23): bootstrap intervals checked against a direct resampling of images
and scipy's bootstrap, McNemar against the binomial, calibration against its definitions; the run's
predictions file, paired comparisons, temperature scaling and the few-shot curve through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, copy_sample
from probe import stats


def _fake(n=400, classes=12, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    correct = rng.random(n) < 0.6 + 0.03 * (y % 4)
    top5 = correct | (rng.random(n) < 0.7)
    return y, correct, top5


def test_intervals_are_a_bootstrap_over_images():
    y, correct, top5 = _fake()
    ours = stats.intervals(y, correct, top5, resamples=4000)
    rng = np.random.default_rng(1)
    direct = {"test_accuracy": [], "balanced_accuracy": [], "top5_accuracy": []}
    for _ in range(4000):  # the images themselves, drawn with replacement
        i = rng.integers(0, len(y), len(y))
        direct["test_accuracy"].append(correct[i].mean())
        direct["top5_accuracy"].append(top5[i].mean())
        direct["balanced_accuracy"].append(np.mean([correct[i][y[i] == c].mean() for c in np.unique(y[i])]))
    for name, values in direct.items():
        np.testing.assert_allclose(ours[name], np.percentile(values, [2.5, 97.5]), atol=0.008, err_msg=name)
    from scipy.stats import bootstrap

    scipy = bootstrap((correct.astype(float),), np.mean, n_resamples=4000, method="percentile", random_state=2)
    np.testing.assert_allclose(ours["test_accuracy"], [scipy.confidence_interval.low, scipy.confidence_interval.high],
                               atol=0.008)
    assert stats.intervals(y, correct, top5) == stats.intervals(y, correct, top5)  # seeded: the same every time


def test_paired_difference_and_mcnemar():
    y, a, _ = _fake(seed=3)
    b = a.copy()
    flip = np.random.default_rng(4).random(len(a)) < 0.15
    b[flip] = ~b[flip]
    result = stats.paired_difference(y, a, b, resamples=4000)
    rng = np.random.default_rng(5)
    direct = []
    for _ in range(4000):  # both runs resampled with the same images
        i = rng.integers(0, len(y), len(y))
        direct.append(a[i].mean() - b[i].mean())
    np.testing.assert_allclose(result["interval"], np.percentile(direct, [2.5, 97.5]), atol=0.008)
    assert result["difference"] == pytest.approx(a.mean() - b.mean())
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    assert (result["only_a_right"], result["only_b_right"]) == (n10, n01)
    tail = sum(math.comb(n01 + n10, i) for i in range(min(n01, n10) + 1)) / 2 ** (n01 + n10)
    assert result["mcnemar_p"] == pytest.approx(min(1.0, 2 * tail))  # the exact two-sided binomial test


def test_calibration_is_its_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 300)
    got = stats.calibration(p, y)
    confidence, right = p.max(1), (p.argmax(1) == y)
    ece = 0.0
    for lo in np.linspace(0, 1, 16)[:-1]:  # 15 equal-width bins, (lo, lo + 1/15]
        in_bin = (confidence > lo) & (confidence <= lo + 1 / 15 + 1e-12)
        if in_bin.any():
            ece += in_bin.mean() * abs(right[in_bin].mean() - confidence[in_bin].mean())
    assert got["ece"] == pytest.approx(ece)
    assert got["nll"] == pytest.approx(-np.log(p[np.arange(300), y]).mean())
    assert got["brier"] == pytest.approx(((p - np.eye(4)[y]) ** 2).sum(1).mean())
    # An over-confident model (probabilities sharpened) is cooled by a temperature above 1.
    sharp = p ** 3 / (p ** 3).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])
    t = stats.fit_temperature(sharp, labels)
    assert 2 < t < 4
    nll = lambda temperature: stats.calibration(stats.apply_temperature(sharp, temperature), labels)["nll"]  # noqa: E731
    assert nll(t) <= min(nll(t * 1.1), nll(t / 1.1))


def test_a_fit_keeps_its_predictions_intervals_and_calibration(run_cli, sample_cache):
    result = run_cli("fit", "--features", sample_cache, "--head", "logreg", "--out", "a", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    low, high = m["intervals"]["test_accuracy"]
    assert low < m["test_accuracy"] < high and 0.02 < high - low < 0.15  # 500 test images
    assert m["interval_method"]["resamples"] == 1000 and m["interval_method"]["method"].startswith("percentile")
    assert {"ece", "nll", "brier"} <= set(m["calibration"]) and len(m["most_confused"]) == 5
    from probe.runs import load_predictions

    p = load_predictions("a")
    assert len(p["true"]) == m["n_test"] == 500 and (p["row"] == np.arange(500)).all() and p["source"] == "test"
    assert float((p["predicted"] == p["true"]).mean()) == m["test_accuracy"]
    assert np.allclose(p["top_k_probability"][:, 0], p["top_k_probability"].max(1))
    summary = run_cli("fit", "--features", sample_cache, "--head", "logreg", "--out", "b")
    assert " ± " in summary.output and "calibration: ECE" in summary.output


def test_compare_paired_runs_and_refuse_other_test_images(run_cli, sample_cache):
    assert run_cli("fit", "--features", sample_cache, "--head", "logreg", "--out", "logreg").exit_code == 0
    assert run_cli("fit", "--features", sample_cache, "--head", "knn", "--out", "knn").exit_code == 0
    paired = run_cli("compare", "logreg", "knn", "--paired", "--out", "cmp")
    assert paired.exit_code == 0, paired.output
    row = next(line for line in paired.output.splitlines() if line.startswith("| logreg on"))
    assert "points" in row and "[" in row and Path("cmp/paired.csv").exists()
    assert run_cli("fit", "--features", sample_cache, "--head", "knn", "--classes", "cat,dog", "--out",
                   "two").exit_code == 0
    assert_one_line_error(run_cli("compare", "logreg", "two", "--paired"), "other test images")


def test_temperature_scaling_is_fitted_on_held_out_training_images(run_cli, sample_cache):
    result = run_cli("fit", "--features", sample_cache, "--head", "knn", "--k", "5", "--calibrate", "temperature",
                     "--out", "cal", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    t = m["temperature_scaling"]
    assert m["n_train"] == 800 and t["n_calibration"] == 200  # a fifth of the training images, held out
    assert t["after"]["nll"] < t["before"]["nll"] and m["identity"]["calibrate"] == "temperature"
    from probe.datasets import SAMPLE_DIR
    from probe.runs import load_head

    image = sorted((SAMPLE_DIR / "test" / "cat").glob("*.jpg"))[0]
    predicted = json.loads(run_cli("predict", "--head", "cal", image, "--json", "--top-k", "10").output)[0]["top"]
    artifact = load_head("cal")
    assert artifact["temperature"] == t["temperature"]
    assert sum(x["probability"] for x in predicted) == pytest.approx(1, abs=1e-5)
    assert min(x["probability"] for x in predicted) > 0  # cooled vote shares: no class at exactly 0


def test_episodes_are_seeded_nested_balanced_and_never_hold_test_images(tmp_path):
    from probe.cache import open_cache
    from probe.extract import extract
    from probe.selection import plan

    data = copy_sample(tmp_path / "d", per_class=12, classes=["cat", "dog", "frog"])  # no test/: held out of train
    cache = open_cache(extract(model="resnet18", weights="none", resolution=32, dataset=f"folder:{data}",
                               cache_dir=str(tmp_path / "c"), progress=False).path)
    for seed in (0, 1):
        episodes = {k: plan(cache, train_per_class=k, seed=seed) for k in (1, 2, 4)}
        for k, p in episodes.items():
            assert np.bincount(p.y).tolist() == [k] * 3
            assert not set(p.train_rows) & set(p.test_rows)  # no test image reaches training
        assert set(episodes[1].train_rows) <= set(episodes[2].train_rows) <= set(episodes[4].train_rows)
    assert set(plan(cache, train_per_class=2, seed=0).train_rows) != set(plan(cache, train_per_class=2, seed=1).train_rows)
    # The same draw whatever other classes are kept: an episode is a function of (seed, class) alone.
    cats = lambda p: set(p.train_rows[p.y == p.names.index("cat")])  # noqa: E731
    assert cats(plan(cache, train_per_class=2, seed=0)) == cats(plan(cache, train_per_class=2, seed=0, classes=["cat", "dog"]))


def test_few_image_folds_keep_views_of_an_image_together():
    from probe.heads import LogisticProbe, few_image_folds

    y = np.repeat([0, 1, 2], 4)
    groups = np.arange(12)
    X_y, X_groups = np.tile(y, 3), np.tile(groups, 3)  # three views of each image
    folds = few_image_folds(X_y, X_groups, seed=0)
    assert len(folds) == 4
    for mask in folds:
        assert not set(X_groups[mask]) & set(X_groups[~mask])
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 5)) + np.repeat(np.eye(3, 5), 2, 0) * 3
    two = LogisticProbe(device="cpu").fit(X, np.repeat([0, 1, 2], 2))
    assert two.search_ == "2-fold" and len(two.sweep_) >= 3
    one = LogisticProbe(device="cpu").fit(X[::2], [0, 1, 2])
    assert one.search_ == "one image per class" and one.C_ == one.one_image_C and one.sweep_ == []


def test_curve_through_the_cli(run_cli, sample_cache):
    result = run_cli("curve", sample_cache, "--shots", "1,4,all", "--seeds", "2", "--head", "logreg,knn")
    assert result.exit_code == 0, result.output
    curve = json.loads(Path("runs/curve/curve.json").read_text())
    assert [line["head"] for line in curve["lines"]] == ["logreg", "knn"]
    points = curve["lines"][0]["points"]
    assert [p["shots"] for p in points] == [1, 4, "all"] and [p["seeds"] for p in points] == [2, 2, 1]
    assert points[0]["interval"][0] <= points[0]["mean"] <= points[0]["interval"][1]
    assert points[2]["images_per_class"] == 100 and points[0]["mean"] < points[2]["mean"]
    assert len({tuple(p["runs"]) for p in points}) == 3 and Path("runs/curve/curve.png").stat().st_size > 1000
    assert "| efficientnet_lite0 / logreg |" in Path("runs/curve/curve.md").read_text()
    again = run_cli("curve", sample_cache, "--shots", "1,4,all", "--seeds", "2", "--head", "logreg,knn")
    assert again.exit_code == 0 and json.loads(Path("runs/curve/curve.json").read_text()) == curve  # reused
    assert_one_line_error(run_cli("curve", sample_cache, "--shots", "500"), "--shots 500", "only 100")


# Found by trying to break the above as a new user would (each reproduced first).

def test_a_finetune_is_scored_with_intervals_and_pairs_with_a_fit_on_the_same_images(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=6, test_per_class=4, classes=["cat", "dog", "ship"])
    args = ["--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--out", "fit").exit_code == 0
    tuned = run_cli("finetune", *args, "--strategy", "linear", "--epochs", "1", "--batch-size", "8", "--out", "ft",
                    "--json")
    assert tuned.exit_code == 0, tuned.output
    m = json.loads(tuned.output[tuned.output.index("{"):tuned.output.rindex("}") + 1])
    assert m["intervals"]["test_accuracy"][0] <= m["test_accuracy"] and "ece" in m["calibration"]
    assert m["test_set_hash"] == json.loads(Path("fit/metrics.json").read_text())["test_set_hash"]
    paired = run_cli("compare", "ft", "fit", "--paired")
    assert paired.exit_code == 0 and "McNemar" in paired.output, paired.output


def test_knn_with_k_past_the_training_set_and_options_of_other_heads_are_refused(run_cli, sample_cache):
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "knn", "--k", "1000"),
                          "only 1000 training rows", "smaller --k")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "logreg", "--k", "5"),
                          "--k is for --head knn")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--augment", "crop"), "give --views N too")


def test_the_held_out_test_split_is_the_same_for_every_seed(tmp_path):
    from probe.cache import open_cache
    from probe.extract import extract
    from probe.selection import plan

    data = copy_sample(tmp_path / "d", per_class=10, classes=["cat", "dog"])
    cache = open_cache(extract(model="resnet18", weights="none", resolution=32, dataset=f"folder:{data}",
                               cache_dir=str(tmp_path / "c"), progress=False).path)
    assert (plan(cache, seed=0).test_rows == plan(cache, seed=3).test_rows).all()


def test_the_suite_table_marks_the_best_of_each_set_of_test_images(run_cli, sample_cache):
    assert run_cli("fit", "--features", sample_cache, "--out", "runs/all").exit_code == 0
    assert run_cli("fit", "--features", sample_cache, "--classes", "cat,dog", "--out", "runs/two").exit_code == 0
    table = run_cli("compare", "--pivot", "runs/all", "runs/two", "--out", "t")
    assert table.exit_code == 0
    rows = [line for line in table.output.splitlines() if line.startswith("| efficientnet_lite0")]
    assert len(rows) == 2 and all("**" in r for r in rows)  # each the best on its own test images


def test_a_damaged_run_is_fitted_again_not_reused(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=6, test_per_class=2, classes=["cat", "dog"])
    args = ["suite", "--models", "resnet18", "--datasets", f"folder:{data}", "--weights", "none", "--resolution", "32",
            "--out", "s"]
    assert run_cli(*args).exit_code == 0
    [run] = [p for p in Path("s").iterdir() if p.is_dir()]
    (run / "head.json").write_text("garbage")
    assert run_cli(*args).exit_code == 0
    assert json.loads(Path("s/suite.json").read_text())["pairs"][0]["status"] == "done"


def test_cache_rm_refuses_a_readable_hdf5_without_probes_attributes_and_plot_checks_first(run_cli, sample_cache):
    import h5py

    Path("cache").mkdir()
    other = Path("cache/mine__resnet18__none__r32__float32__0123456789.h5")
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    assert_one_line_error(run_cli("cache", "rm", other), "not a probe cache")
    assert other.exists()
    assert run_cli("fit", "--features", sample_cache, "--out", "r").exit_code == 0
    Path("afile").write_text("")
    assert_one_line_error(run_cli("compare", "r", "--plot", "afile", "--out", "cmp"), "afile")
    assert not Path("cmp").exists() or not any(Path("cmp").iterdir())
