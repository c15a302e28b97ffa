"""probe fit and probe predict through the real CLI, on real caches."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, copy_sample
from probe.cache import open_cache
from probe.datasets import SAMPLE_DIR
from probe.fit import fit
from probe.selection import select
from probe.runs import load_head


def test_extract_fit_predict_end_to_end(run_cli, tmp_path):
    """The issue's 'done when': extract, fit logreg, predict an image file with the saved head."""
    args = ["--model", "efficientnet_lite0", "--dataset", "sample", "--resolution", "64"]
    assert run_cli("extract", *args).exit_code == 0
    result = run_cli("fit", *args, "--head", "logreg")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    [run] = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_train"] == 1000 and metrics["n_test"] == 500 and metrics["test_accuracy"] > 0.4
    assert len(metrics["confusion_matrix"]) == 10 and sum(map(sum, metrics["confusion_matrix"])) == 500
    assert set(metrics["per_class_accuracy"]) == set(metrics["classes"])
    # balanced accuracy: the mean recall per class; top-5: the true class among the five most probable
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(list(metrics["per_class_accuracy"].values())))
    assert metrics["test_accuracy"] <= metrics["top5_accuracy"] <= 1 and metrics["top5_accuracy"] > 0.8
    assert metrics["hyperparameters"]["C_chosen"] in [s["C"] for s in metrics["hyperparameters"]["sweep"]]
    assert metrics["cache"].endswith(".h5") and metrics["fit_seconds"] > 0

    # predict on an image file gives what the head gives on that image's cached feature
    image = SAMPLE_DIR / "test" / "airplane" / "0000.jpg"  # row 0 of the test split
    predicted = run_cli("predict", "--head", run / "head.json", image, "--json", "--top-k", "3")
    assert predicted.exit_code == 0, predicted.output
    [answer] = json.loads(predicted.stdout)
    artifact = load_head(run)
    features, _ = open_cache(metrics["cache"]).load("test")
    proba = artifact["pipeline"].predict_proba(features[:1])[0]
    assert answer["top"][0]["class"] == metrics["classes"][int(proba.argmax())]
    assert answer["top"][0]["probability"] == pytest.approx(float(proba.max()), abs=1e-4)
    assert len(answer["top"]) == 3


@pytest.mark.parametrize("head", ["linear", "mlp", "knn"])
def test_other_heads_through_the_cli(run_cli, sample_cache, head):
    result = run_cli("fit", "--features", sample_cache, "--head", head, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["test_accuracy"] > 0.4


def test_subsets_select_exactly_what_they_say(sample_cache):
    cache = open_cache(sample_cache)
    names, X, y, Xt, yt, _, _ = select(cache, classes=["cat", "5", "dog"], train_per_class=7, seed=1)
    assert names == ["cat", "dog"]  # "5" is dog's index: the same class once
    assert np.bincount(y).tolist() == [7, 7] and len(X) == 14
    assert np.bincount(yt).tolist() == [50, 50]
    full_X, full_y = cache.load("train")
    cat_rows = {r.tobytes() for r in full_X[full_y == 3]}
    assert all(r.tobytes() in cat_rows for r in X[y == 0])
    again = select(cache, classes=["cat", "dog"], train_per_class=7, seed=1)[1]
    other = select(cache, classes=["cat", "dog"], train_per_class=7, seed=2)[1]
    np.testing.assert_array_equal(again, X)
    assert not np.array_equal(other, X)


def test_same_seed_gives_the_same_metrics(sample_cache, tmp_path):
    a = fit(features=str(sample_cache), head="mlp", train_per_class=20, seed=4, out=str(tmp_path / "a")).metrics
    b = fit(features=str(sample_cache), head="mlp", train_per_class=20, seed=4, out=str(tmp_path / "b")).metrics
    for m in (a, b):
        for timing in ("fit_seconds", "wall_seconds", "created"):
            m.pop(timing)
    assert a == b


def test_fit_input_errors_are_one_line(run_cli, sample_cache, tmp_path):
    assert_one_line_error(run_cli("fit", "--model", "resnet18", "--dataset", "sample"),
                          "no cached features", "probe extract --model resnet18 --dataset sample")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--classes", "cat,unicorn"), "unicorn")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--train-per-class", "101"),
                          "--train-per-class 101", "only 100")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--train-per-class", "0"), "must be positive")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "svm"), "unknown head", "logreg")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--model", "resnet18"),
                          "efficientnet_lite0 features, not resnet18")
    assert_one_line_error(run_cli("fit", "--features", tmp_path / "absent.h5"), "no cache file")
    assert not (tmp_path / "runs").exists()


def test_predict_names_unreadable_images_and_still_predicts_the_others(run_cli, sample_cache, tmp_path):
    out = tmp_path / "run"
    fit(features=str(sample_cache), head="knn", out=str(out))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    good = SAMPLE_DIR / "test" / "ship" / "0001.jpg"
    result = run_cli("predict", "--head", out, bad, good)
    assert result.exit_code == 2
    assert "notes.txt" in result.stderr and "Traceback" not in result.output
    assert result.stdout.startswith(str(good))


def test_predict_with_a_missing_weights_file_or_a_damaged_head(run_cli, tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    data = copy_sample(tmp_path / "d", per_class=3, test_per_class=1)
    args = ["--model", "resnet18", "--weights", weights, "--resolution", "32", "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--head", "knn", "--k", "3", "--out", tmp_path / "run").exit_code == 0
    image = next((data / "test").rglob("*.jpg"))
    assert run_cli("predict", "--head", tmp_path / "run", image).exit_code == 0
    weights.unlink()
    assert_one_line_error(run_cli("predict", "--head", tmp_path / "run", image), "weights file", "r18.pt", "is gone")

    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "run", damaged)
    (damaged / "head.npz").write_bytes((damaged / "head.npz").read_bytes()[:100])
    assert_one_line_error(run_cli("predict", "--head", damaged, image), "head.npz", "probe fit")
    (damaged / "head.json").write_text("{")
    assert_one_line_error(run_cli("predict", "--head", damaged, image), "damaged", "probe fit")
    assert_one_line_error(run_cli("predict", "--head", tmp_path / "nope", image), "no head")


def test_two_fits_writing_the_same_head_leave_a_whole_one(sample_cache, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out = str(tmp_path / "shared")
    # spawn, not fork: a forked child of a process using torch's thread pool can deadlock.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(fit, features=str(sample_cache), head="knn", out=out) for _ in range(2)]
        [j.result() for j in jobs]
    assert load_head(tmp_path / "shared")["model"] == "efficientnet_lite0"
    assert json.loads((tmp_path / "shared" / "metrics.json").read_text())["method"] == "knn"
    names = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert names == [".lock", "head.json", "head.npz", "metrics.json", "predictions.h5"]


def test_class_weight_through_the_cli(run_cli, sample_cache):
    result = run_cli("fit", "--features", sample_cache, "--head", "linear", "--class-weight", "balanced", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["hyperparameters"]["class_weight"] == "balanced"
    assert ["__linear__balanced__" in p.name for p in Path("runs").iterdir()] == [True]  # its own run folder
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "knn", "--class-weight", "balanced"),
                          "--class-weight", "not knn")
    two = run_cli("fit", "--features", sample_cache, "--classes", "cat,dog", "--json")
    assert json.loads(two.stdout)["top5_accuracy"] is None  # two classes: top-5 means nothing


class _Payload:
    """What a malicious pickle does: unpickling it calls a function, here one that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_head_file_is_data_and_a_pickle_is_opened_only_when_trusted(run_cli, sample_cache, tmp_path):
    import joblib

    image = next((SAMPLE_DIR / "test" / "cat").glob("*.jpg"))
    marker = tmp_path / "created-by-the-pickle"
    evil = tmp_path / "evil"
    evil.mkdir()
    joblib.dump({"format": 1, "pipeline": _Payload(marker)}, evil / "head.joblib")
    assert_one_line_error(run_cli("predict", "--head", evil, image), "pickle", "--trust-pickle")
    assert_one_line_error(run_cli("predict", "--head", evil / "head.joblib", image), "pickle")
    assert_one_line_error(run_cli("finetune", "--init-head", evil, "--strategy", "lp-ft", "--model", "resnet18",
                                  "--weights", "none", "--resolution", "32", "--dataset", "sample"), "pickle")
    assert not marker.exists()

    fit(features=str(sample_cache), head="logreg", C=1.0, out=str(tmp_path / "run"))
    old = tmp_path / "old"  # a head of probe 0.4, of one's own: the same artifact, pickled
    old.mkdir()
    joblib.dump({**load_head(tmp_path / "run"), "format": 1}, old / "head.joblib")
    assert_one_line_error(run_cli("predict", "--head", old, image), "--trust-pickle")
    trusted, safe = (run_cli("predict", "--head", h, image, "--json", *extra) for h, extra in
                     ((old, ["--trust-pickle"]), (tmp_path / "run", [])))
    assert trusted.exit_code == 0 and json.loads(trusted.output) == json.loads(safe.output)

    record = json.loads((tmp_path / "run" / "head.json").read_text())
    record["artifact"]["pipeline"]["__object__"] = "os.system"  # a class no probe head holds
    (tmp_path / "run" / "head.json").write_text(json.dumps(record))
    assert_one_line_error(run_cli("predict", "--head", tmp_path / "run", image), "os.system", "refused")
