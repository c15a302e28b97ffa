"""Augmented views in the cache (`probe extract --views K`) and a probe trained on them."""

import json

import h5py
import numpy as np

from conftest import assert_one_line_error, copy_sample
from probe.cache import open_cache
from probe.datasets import SAMPLE_DIR
from probe.extract import extract
from probe.heads import LogisticProbe

TINY = ["--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", "sample"]


def test_views_extract_fit_and_predict_end_to_end(run_cli, tmp_path):
    assert run_cli("extract", *TINY).exit_code == 0
    assert run_cli("extract", *TINY, "--views", "2", "--augment", "crop").exit_code == 0
    plain, viewed = sorted((tmp_path / "cache").glob("*.h5"), key=lambda p: "2xcrop" in p.name)
    assert "2xcrop" in viewed.name and "views" not in open_cache(plain).key  # older names unchanged
    with h5py.File(viewed) as f:
        assert f["train/views"].shape == (2, 1000, 512) and f.attrs["views"] == 2 and f.attrs["augment"] == "crop"
        views, features = f["train/views"][:], f["train/features"][:]
        np.testing.assert_array_equal(f["test/features"][:], open_cache(plain).load("test")[0])  # test: plain only
    np.testing.assert_array_equal(features, open_cache(plain).load("train")[0])
    assert not np.allclose(views[0], features) and not np.allclose(views[0], views[1])

    m = json.loads(run_cli("fit", "--features", viewed, "--json", "--out", "all").stdout)
    assert m["views"] == 2 and m["augment"] == "crop" and m["n_train"] == 1000 and m["n_train_rows"] == 3000
    m = json.loads(run_cli("fit", "--features", viewed, "--views", "0", "--json", "--out", "none").stdout)
    assert m["views"] == 0 and m["n_train_rows"] == 1000
    assert_one_line_error(run_cli("fit", "--features", viewed, "--views", "3"), "--views 3", "holds 2")
    assert_one_line_error(run_cli("fit", "--features", viewed, "--views", "-1"), "--views must be 0 or more")
    assert run_cli("predict", "--head", "all", SAMPLE_DIR / "test" / "cat" / "0000.jpg").exit_code == 0
    assert_one_line_error(run_cli("extract", *TINY, "--views", "2", "--augment", "none"), "--augment")


def test_a_cache_of_views_and_layers_fits_its_layers_without_naming_views(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=6, test_per_class=3, classes=["cat", "dog"])
    assert run_cli("extract", *TINY[:-1], f"folder:{data}", "--views", "1", "--layers", "layer4").exit_code == 0
    [cache] = (tmp_path / "cache").glob("*.h5")
    m = json.loads(run_cli("fit", "--features", cache, "--layer", "layer4", "--C", "1", "--json", "--out", "l4").stdout)
    assert m["views"] == 0 and m["layer"] == "layer4" and m["n_train_rows"] == 12
    assert_one_line_error(run_cli("fit", "--features", cache, "--layer", "layer4", "--views", "1"), "final feature only")
    assert run_cli("depth", cache).exit_code == 0


def test_a_view_is_the_same_whatever_the_batch_size_so_a_resume_repeats_it(tmp_path):
    """Each image's crop is drawn from (view, row) alone: what resuming from a shard boundary relies on."""
    data = copy_sample(tmp_path / "d", per_class=10, test_per_class=1)
    paths = [extract(model="resnet18", weights="none", resolution=32, dataset=f"folder:{data}", views=2, batch_size=b,
                     cache_dir=str(tmp_path / str(b)), device="cpu", progress=False).path for b in (7, 64)]
    a, b = (h5py.File(p)["train/views"][:] for p in paths)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_sweep_keeps_every_view_of_a_validation_image_out_of_training():
    """Pure noise, each image stored as 4 identical rows (views). If views of validation images were
    trained on, the sweep would memorize them and validate near 100%; kept apart, it stays at chance."""
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(200, 512)).astype(np.float32), rng.integers(0, 2, 200)
    X, y, groups = np.tile(images, (4, 1)), np.tile(labels, 4), np.tile(np.arange(200), 4)
    leaky = LogisticProbe(device="cpu").fit(X, y)
    kept_apart = LogisticProbe(device="cpu").fit(X, y, groups=groups)
    assert max(a for _, a in leaky.sweep_) > 0.9  # the leak this guards against is real
    assert max(a for _, a in kept_apart.sweep_) < 0.65


def test_views_of_non_square_small_images_crop_the_frame_the_plain_features_show():
    """Small non-square images (48 x 24): a blue centre square between red side bands. The plain
    features see the centre square; no view of any augmentation may show the red bands either."""
    import torch

    from probe.extract import _view_transform
    from probe.preprocess import Preprocess

    image = torch.zeros(1, 3, 24, 48)
    image[:, 0, :, :12] = image[:, 0, :, 36:] = 255
    image[:, 2, :, 12:36] = 255
    for kind in ("rrc", "crop", "flip"):
        for view in range(4):
            seen = _view_transform(Preprocess(32, 32), kind, view)(image, 0)
            assert seen.shape == (1, 3, 32, 32) and seen[:, 0].max() < 1, kind
