import json
import os

import h5py
import numpy as np
import pytest

from conftest import SAMPLE_RES, assert_one_line_error, copy_sample, kill_extract_after_shards
from probe.cache import open_cache
from probe.datasets import load_dataset
from probe.errors import ProbeError
from probe.extract import extract


def test_sample_cache_has_the_documented_layout(sample_cache):
    with h5py.File(sample_cache, "r") as f:
        assert f["train/features"].shape == (1000, 1280) and f["train/features"].dtype == np.float32
        assert f["test/features"].shape == (500, 1280)
        assert f["train/features"].chunks is not None
        labels = f["train/labels"][...]
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [100] * 10
        attrs = dict(f.attrs)
    assert attrs["complete"] and attrs["probe_format"] == 1
    assert attrs["model"] == "efficientnet_lite0" and attrs["resolution"] == SAMPLE_RES
    assert attrs["weights"] == "default" and attrs["dataset"] == "sample" and attrs["feature_dim"] == 1280
    assert json.loads(attrs["classes"])[:3] == ["airplane", "automobile", "bird"]
    assert json.loads(attrs["preprocessing"])["mean"] == pytest.approx([127 / 255] * 3)
    assert {"torch", "h5py", "timm"} <= set(json.loads(attrs["versions"]))
    assert sample_cache.name.startswith("sample__efficientnet_lite0__default__r64__float32__")


def test_same_command_is_a_cache_hit_and_a_key_change_is_another_file(tmp_path, run_cli):
    data = copy_sample(tmp_path / "d", per_class=2, test_per_class=1)
    args = ["extract", "--model", "resnet18", "--weights", "none", "--dataset", f"folder:{data}", "--resolution", "32"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    [path] = (tmp_path / "cache").glob("*.h5")
    mtime = path.stat().st_mtime_ns
    second = run_cli(*args)
    assert second.exit_code == 0 and "cache hit" in second.output
    assert path.stat().st_mtime_ns == mtime
    assert run_cli(*args, "--force").exit_code == 0 and path.stat().st_mtime_ns != mtime
    assert run_cli(*args[:-1], "48").exit_code == 0  # another resolution
    assert run_cli(*args, "--dtype", "float16").exit_code == 0
    files = sorted((tmp_path / "cache").glob("*.h5"))
    assert len(files) == 3
    assert open_cache(next(f for f in files if "float16" in f.name)).load("train")[0].dtype == np.float16
    # Changing the images changes the fingerprint and so the file.
    (data / "train" / "cat" / sorted(os.listdir(data / "train" / "cat"))[0]).unlink()
    assert run_cli(*args).exit_code == 0
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 4


def test_mixed_sizes_and_modes_go_through_both_image_paths(mixed_folder, tmp_path):
    ds = load_dataset(f"folder:{mixed_folder}")
    assert ds.classes == ["ants", "bees"] and len(ds.splits["train"]) == 6
    result = extract(model="resnet18", weights="none", resolution=32, dataset=f"folder:{mixed_folder}",
                     cache_dir=str(tmp_path / "c"), num_workers=0, progress=False)
    cache = open_cache(result.path)
    X, y = cache.load("train")
    assert X.shape == (6, 512) and np.isfinite(X).all() and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_small_images_give_the_same_features_through_the_array_and_the_worker_path(tmp_path):
    from probe.batches import decode_small, iter_batches
    from probe.device import resolve_device
    from probe.extract import Embedder
    from probe.preprocess import Preprocess

    split = load_dataset("sample").splits["test"]
    split = split.subset(range(8))
    pre = Preprocess(64, 64)
    embed = Embedder("resnet18", "none", pre, None, resolve_device("cpu"))
    as_array = decode_small(split)
    assert as_array.pixels is not None
    a = np.concatenate([embed(b).numpy() for b in iter_batches(as_array, pre, 4, embed.device)])
    b = np.concatenate([embed(b).numpy() for b in iter_batches(split, pre, 4, embed.device, num_workers=0)])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cifar10_in_torchvisions_format_reads_through_the_loader(cifar_dir, tmp_path):
    ds = load_dataset("cifar10", data_dir=cifar_dir, download=False)
    assert len(ds.splits["train"]) == 100 and len(ds.splits["test"]) == 20
    assert ds.splits["train"].pixels.shape == (100, 32, 32, 3) and ds.classes[0] == "airplane"
    result = extract(model="resnet18", weights="none", resolution=32, data_dir=str(cifar_dir),
                     cache_dir=str(tmp_path / "c"), progress=False)
    assert result.path.name.startswith("cifar10__resnet18__none__r32")
    X, y = open_cache(result.path).load("train")
    assert X.shape == (100, 512)
    np.testing.assert_array_equal(y, ds.splits["train"].labels)


def test_cifar10_download_failure_is_one_clear_line(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("PROBE_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    result = run_cli("extract", "--data-dir", tmp_path / "nothing-here", "--weights", "none")
    assert_one_line_error(result, "could not download CIFAR-10", "folder:PATH", "sample")


def test_a_killed_extraction_resumes_to_the_same_features(tmp_path):
    data = copy_sample(tmp_path / "d", per_class=6, test_per_class=3)
    args = ["--model", "resnet18", "--weights", "none", "--resolution", "64", "--dataset", f"folder:{data}",
            "--batch-size", "4", "--device", "cpu"]
    reference = extract(**_as_kwargs(args), cache_dir=str(tmp_path / "ref"), progress=False).path

    cache_dir = tmp_path / "cache"
    for kill_after in (2, 17):  # shards: early in train, then into the test split
        kill_extract_after_shards(args, cache_dir, kill_after)
        assert not list(cache_dir.glob("*.h5")), "a killed run must not leave a file that looks complete"
    result = extract(**_as_kwargs(args), cache_dir=str(cache_dir), progress=False)
    assert 0 < result.images < 90  # it resumed rather than starting over
    assert not list(cache_dir.glob("*.parts"))
    for split in ("train", "test"):
        got, want = open_cache(result.path).load(split), open_cache(reference).load(split)
        np.testing.assert_array_equal(got[0], want[0])  # bit for bit
        np.testing.assert_array_equal(got[1], want[1])


def _as_kwargs(args):
    pairs = dict(zip(args[::2], args[1::2]))
    return {"model": pairs["--model"], "weights": pairs["--weights"], "resolution": int(pairs["--resolution"]),
            "dataset": pairs["--dataset"], "batch_size": int(pairs["--batch-size"]), "device": pairs["--device"]}


def test_truncated_or_incomplete_cache_is_refused_naming_the_file(sample_cache, tmp_path, run_cli):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(sample_cache.read_bytes()[: sample_cache.stat().st_size // 2])
    with pytest.raises(ProbeError, match="truncated.h5.*run probe extract again"):
        open_cache(truncated).load("train")
    incomplete = tmp_path / "incomplete.h5"
    incomplete.write_bytes(sample_cache.read_bytes())
    with h5py.File(incomplete, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(ProbeError, match="incomplete"):
        open_cache(incomplete)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\0" * 4096)
    assert_one_line_error(run_cli("fit", "--features", garbage), "garbage.h5", "probe extract")


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet19"], ["unknown model", "resnet18"]),
    (["--dataset", "places365"], ["unknown data set", "folder:PATH"]),
    (["--dataset", "folder:/no/such/dir"], ["not an image folder"]),
    (["--dataset", "sample", "--batch-size", "0"], ["batch size must be positive"]),
    (["--dataset", "sample", "--dtype", "int8"], ["unknown dtype"]),
    (["--dataset", "sample", "--device", "tpu"], ["unknown device"]),
    (["--dataset", "sample", "--weights", "/no/such/file.pt"], ["weights /no/such/file.pt", "not found"]),
])
def test_bad_extract_input_is_one_line_and_exit_code_2(run_cli, tmp_path, args, words):
    assert_one_line_error(run_cli("extract", *args), *words)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_folder_problems_are_named(tmp_path, run_cli):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    assert_one_line_error(run_cli("extract", "--dataset", f"folder:{tmp_path / 'empty'}"), "no images")
    data = copy_sample(tmp_path / "d", per_class=1, test_per_class=1, classes=["cat", "dog"])
    (data / "test" / "cow").mkdir()
    assert_one_line_error(run_cli("extract", "--dataset", f"folder:{data}"), "classes that train lacks", "cow")
    (data / "test" / "cow").rmdir()
    (data / "train" / "ant").mkdir()  # a class without training images would shift the labels after it
    assert_one_line_error(run_cli("extract", "--dataset", f"folder:{data}"), "train/ant has no images")
    (data / "train" / "ant").rmdir()
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli("extract", "--weights", "none", "--model", "resnet18", "--dataset", f"folder:{data}")
    assert_one_line_error(result, "cannot read image", "broken.jpg")
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_weights_file_of_another_architecture_is_one_line_and_writes_nothing(run_cli, tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    result = run_cli("extract", "--dataset", "sample", "--model", "resnet50", "--weights", weights)
    assert_one_line_error(result, "r18.pt", "does not fit resnet50", "keys")
    assert not list((tmp_path / "cache").glob("*.h5")) and not list((tmp_path / "cache").glob("*.parts"))
