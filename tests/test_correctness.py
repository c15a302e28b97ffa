"""Issue 17's review findings, each a regression test that failed before its fix: what a saved head
remembers, what a cache trusts, and the smaller wrong results."""

import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import assert_one_line_error, copy_sample, write_image
from probe.cache import open_cache
from probe.preprocess import Preprocess
from probe.datasets import SAMPLE_DIR, load_dataset
from probe.augment import augment
from probe.finetune import _load
from probe.fit import fit
from probe.predict import predict
from probe.runs import load_head

TINY = ["--model", "resnet18", "--resolution", "32"]


def _agreement(run, cache_path, images, split="test"):
    """Share of images where probe predict's top class equals the head's prediction on the cached feature."""
    artifact = load_head(run)
    X, _ = open_cache(cache_path).load(split)
    expected = [artifact["classes"][int(c)] for c in artifact["pipeline"].predict(X)]
    answers = predict(run, images, device="cpu")
    return np.mean([a["top"][0]["class"] == e for a, e in zip(answers, expected)])


def _test_images(folder):
    """The test images of a folder data set in the cache's row order (classes sorted, files sorted)."""
    return [str(f) for c in sorted(p for p in (folder / "test").iterdir()) for f in sorted(c.iterdir())]


def test_a_head_fitted_on_a_features_file_rebuilds_the_caches_backbone_not_the_cli_default(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=3, test_per_class=2)
    assert run_cli("extract", *TINY, "--weights", "none", "--dataset", f"folder:{data}").exit_code == 0
    [cache_file] = (tmp_path / "cache").glob("*.h5")
    # No --weights here: the head must still record the weights the cache was made with.
    assert run_cli("fit", "--features", cache_file, "--head", "knn", "--k", "3", "--out", tmp_path / "run").exit_code == 0
    artifact = load_head(tmp_path / "run")
    assert artifact["weights"] == "none" == artifact["weights_identity"]
    assert _agreement(tmp_path / "run", cache_file, _test_images(data)) == 1.0


def test_predict_refuses_a_weights_file_that_changed_and_finds_it_from_another_folder(run_cli, tmp_path, monkeypatch):
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    data = copy_sample(tmp_path / "d", per_class=3, test_per_class=2)
    assert run_cli("extract", *TINY, "--weights", "w.pt", "--dataset", f"folder:{data}").exit_code == 0
    assert run_cli("fit", *TINY, "--weights", "w.pt", "--dataset", f"folder:{data}", "--head", "knn", "--k", "3",
                   "--out", "run").exit_code == 0
    run, [cache_file] = tmp_path / "run", list((tmp_path / "cache").glob("*.h5"))
    assert load_head(run)["weights"] == str(tmp_path / "w.pt")  # absolute, not as typed

    # From another folder that holds a different w.pt, the head still uses its own file.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), elsewhere / "w.pt")
    monkeypatch.chdir(elsewhere)
    assert _agreement(run, cache_file, _test_images(data)) == 1.0

    # The file replaced by another: refused, one line.
    (tmp_path / "w.pt").write_bytes((elsewhere / "w.pt").read_bytes())
    image = _test_images(data)[0]
    assert_one_line_error(run_cli("predict", "--head", run, image), "w.pt", "has changed")


def _bmp_folder(root, colors):
    for i, color in enumerate(colors):
        image = Image.new("RGB", (20, 20), color)
        for split in ("train", "test"):
            path = root / split / ("a" if i % 2 else "b") / f"{i}.bmp"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


def test_an_image_replaced_by_another_of_the_same_size_is_not_a_cache_hit(run_cli, tmp_path):
    data = _bmp_folder(tmp_path / "d", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)])
    before = load_dataset(f"folder:{data}").fingerprint
    args = ["extract", *TINY, "--weights", "none", "--dataset", f"folder:{data}"]
    assert run_cli(*args).exit_code == 0
    replaced = data / "train" / "b" / "0.bmp"
    size = replaced.stat().st_size
    Image.new("RGB", (20, 20), (200, 100, 0)).save(replaced)
    assert replaced.stat().st_size == size  # a BMP of the same dimensions: same byte size
    assert load_dataset(f"folder:{data}").fingerprint != before
    second = run_cli(*args)
    assert second.exit_code == 0 and "cache hit" not in second.output
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 2


@pytest.fixture(scope="module")
def large_image_folder(tmp_path_factory):
    """Photos bigger than the small-image path: decoded and resized in DataLoader workers."""
    root = tmp_path_factory.mktemp("large")
    sizes = [(120, 90), (80, 140), (100, 100)]
    for split, n in (("train", 8), ("test", 6)):
        for c, cls in enumerate(("ants", "bees", "wasps")):
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", sizes[(i + c) % 3], "RGB", seed=hash((split, c, i)) % 2**32)
    return root


@pytest.mark.parametrize("head", ["logreg", "linear", "mlp", "knn"])
def test_predict_gives_the_heads_class_on_every_test_image(sample_cache, large_image_folder, tmp_path, head):
    """README's promise, for CIFAR-sized images (the sample) and for large ones: probe predict on an image
    file returns the class the fitted head gives on that image's cached feature. knn with k=4 ties often."""
    from probe.extract import extract

    options = {"k": 4} if head == "knn" else {}
    fit(features=str(sample_cache), head=head, out=str(tmp_path / "small"), device="cpu", **options)
    assert _agreement(tmp_path / "small", sample_cache, _test_images(SAMPLE_DIR)) == 1.0

    large = extract(model="resnet18", weights="none", resolution=48, dataset=f"folder:{large_image_folder}",
                    cache_dir=str(tmp_path / "cache"), device="cpu", num_workers=0, progress=False).path
    fit(features=str(large), head=head, out=str(tmp_path / "large"), device="cpu", **options)
    assert _agreement(tmp_path / "large", large, _test_images(large_image_folder)) == 1.0


def test_finetune_trains_on_the_frame_that_evaluation_shows(tmp_path):
    """Small non-square images: a blue centre square between red side bands. Evaluation center-crops
    to the blue square; the training views (every augmentation) must not see the red bands either."""
    image = np.zeros((24, 48, 3), np.uint8)
    image[:, :12, 0] = image[:, 36:, 0] = 255
    image[:, 12:36, 2] = 255
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(2):
                path = tmp_path / "d" / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
    data = _load(load_dataset(f"folder:{tmp_path / 'd'}"), Preprocess(32, 32), None, None, 0)
    batches = [next(squares.batches(range(4), 4, torch.device("cpu"))) for squares in (data.train, data.test)]
    for pixels in batches:  # the squares a fine-tune reads, a batch at a time
        assert pixels.shape[1:] == (3, 24, 24) and pixels[:, 0].max() == 0
    images = batches[0].float()
    for kind in ("rrc", "crop", "none"):
        views = augment(images, Preprocess(32, 32), kind, torch.Generator().manual_seed(0))
        assert views[:, 0].max() < 1, kind  # no red anywhere (the crop's zero padding is black)


def test_a_killed_finetune_resumes_exactly_as_a_straight_run(tmp_path):
    model = "efficientnet_b0"  # BatchNorm and stochastic depth: both must resume where they were
    from test_reliability import _probe

    data = copy_sample(tmp_path / "d", per_class=4, test_per_class=2, classes=["cat", "dog"])
    args = ["-q", "finetune", "--strategy", "full", "--model", model, "--weights", "none", "--resolution", "32",
            "--dataset", f"folder:{data}", "--epochs", "3", "--batch-size", "4", "--device", "cpu", "--json", "--out"]
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    proc, straight = _probe(*args, tmp_path / "run"), _probe(*args, tmp_path / "straight")  # one killed, one not
    deadline = time.time() + 240
    while not checkpoint.exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(torch.load(checkpoint, weights_only=True)["history"]) < 3
    assert not (tmp_path / "run" / "metrics.json").exists()  # a killed run has no result yet
    resumed = _probe(*args, tmp_path / "run", "--resume")
    (out_r, err_r), (out_s, err_s) = resumed.communicate(timeout=300), straight.communicate(timeout=300)
    assert resumed.returncode == 0 == straight.returncode, (err_r, err_s)
    histories = [json.loads(out)["history"] for out in (out_r, out_s)]
    assert [h["epoch"] for h in histories[0]] == [1, 2, 3]  # the epochs before the kill, then the rest
    assert [h["train_loss"] for h in histories[0]] == [h["train_loss"] for h in histories[1]]


def test_metrics_are_strict_json_when_a_class_has_no_test_images(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=3, test_per_class=2, classes=["cat", "dog", "frog"])
    for f in (data / "test" / "frog").iterdir():
        f.unlink()
    args = [*TINY, "--weights", "none", "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    result = run_cli("fit", *args, "--head", "knn", "--k", "3", "--out", "run")
    assert result.exit_code == 0 and "no test images of frog" in result.output

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=no_constants)
    assert metrics["per_class_accuracy"]["frog"] is None and metrics["classes_without_test_images"] == ["frog"]
    assert metrics["per_class_accuracy"]["cat"] is not None
