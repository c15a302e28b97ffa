"""Faults of the machine, injected for real: a full or read-only disk (tmpfs mounts, as root), an
allocation that cannot succeed, files that are not weights, and folders without a test split."""

import json
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, copy_sample
from probe.cache import open_cache
from probe.fit import select

TINY = ["--model", "resnet18", "--weights", "none", "--resolution", "32"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes; resize(size) grows it keeping its files."""
    mounted = []

    def mount(size: int, name: str = "disk"):
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    def remount(path, options: str):
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    yield mount, remount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


def _leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _features(cache_dir):
    [path] = cache_dir.glob("*.h5")
    cache = open_cache(path)
    return [cache.load(s)[0] for s in cache.splits]


@pytest.fixture
def data(tmp_path):
    return copy_sample(tmp_path / "d", per_class=20, test_per_class=5)  # 250 images, 512 KB of features


@pytest.fixture
def reference(run_cli, tmp_path, data):
    """The features of an uninterrupted run on an ordinary disk."""
    assert run_cli("extract", *TINY, "--dataset", f"folder:{data}", "--cache-dir", tmp_path / "ref").exit_code == 0
    return _features(tmp_path / "ref")


def test_a_disk_full_at_a_shard_is_one_line_and_the_rerun_gives_the_same_file(run_cli, small_disk, data, reference):
    mount, remount = small_disk
    disk = mount(100_000)  # less than the train split's shard: 200 images x 512 floats
    args = ["extract", *TINY, "--dataset", f"folder:{data}", "--cache-dir", disk / "cache"]
    assert_one_line_error(run_cli(*args), "not enough disk space", "free")
    assert _leftovers(disk) == [] and not list((disk / "cache").glob("*.h5"))
    remount(disk, "size=8m")
    assert run_cli(*args).exit_code == 0
    for got, want in zip(_features(disk / "cache"), reference):
        np.testing.assert_array_equal(got, want)


def test_a_disk_full_at_assembly_keeps_the_shards_and_resumes_once_freed(run_cli, small_disk, data, reference):
    mount, remount = small_disk
    disk = mount(1_200_000)  # the shards fit (512 KB), the HDF5 file beside them does not
    args = ["extract", *TINY, "--dataset", f"folder:{data}", "--cache-dir", disk / "cache"]
    assert_one_line_error(run_cli(*args), "not enough disk space", "assembling", "shards", "kept")
    [parts] = (disk / "cache").glob("*.h5.parts")
    assert sorted(p.name[:-4] for p in parts.glob("*.npy")) == ["test-000000000-000000050", "train-000000000-000000200"]
    assert _leftovers(disk) == []
    remount(disk, "size=8m")
    again = run_cli(*args)
    assert again.exit_code == 0 and "no backbone pass was needed" in again.output
    for got, want in zip(_features(disk / "cache"), reference):
        np.testing.assert_array_equal(got, want)
    assert not parts.exists()


def test_a_disk_full_at_the_head_write_leaves_no_head_and_the_rerun_writes_it(run_cli, small_disk, data, tmp_path):
    mount, remount = small_disk
    assert run_cli("extract", *TINY, "--dataset", f"folder:{data}").exit_code == 0
    disk = mount(64_000)  # a kNN head holds its 200 x 512 training features: 400 KB
    args = ["fit", *TINY, "--dataset", f"folder:{data}", "--head", "knn", "--out", disk / "run"]
    assert_one_line_error(run_cli(*args), "not enough disk space", "head.joblib")
    assert not (disk / "run" / "head.joblib").exists() and not (disk / "run" / "metrics.json").exists()
    assert _leftovers(disk) == []
    remount(disk, "size=4m")
    assert run_cli(*args).exit_code == 0
    assert joblib.load(disk / "run" / "head.joblib")["model"] == "resnet18"


def test_a_read_only_cache_folder_is_one_line(run_cli, small_disk, data):
    mount, remount = small_disk
    disk = mount(4_000_000)
    remount(disk, "ro")
    assert_one_line_error(run_cli("extract", *TINY, "--dataset", f"folder:{data}", "--cache-dir", disk / "cache"),
                          "cannot create folder", "Read-only")


def test_an_allocation_that_cannot_succeed_is_one_line(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=1, test_per_class=1)
    result = run_cli("extract", "--model", "resnet18", "--weights", "none", "--resolution", "99999",
                     "--dataset", f"folder:{data}")
    assert_one_line_error(result, "out of memory", "--batch-size", "--resolution", "TiB")


def test_a_batch_that_does_not_fit_is_retried_in_halves(tmp_path):
    """A real allocation failure: the process's address space is capped so that a batch of 64 at 224 px
    cannot run through ResNet-18, but a smaller one can. The features equal an uncapped run's."""
    data = copy_sample(tmp_path / "d", per_class=7, test_per_class=0)
    code = f"""
import resource, sys
from probe.extract import extract
extract(model="resnet18", weights="none", resolution=224, dataset="folder:{data}", cache_dir="{tmp_path}/warm",
        batch_size=2, device="cpu", progress=False)  # every allocation pool and thread is up
vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 2**20, resource.RLIM_INFINITY))
extract(model="resnet18", weights="none", resolution=224, dataset="folder:{data}", cache_dir="{tmp_path}/capped",
        batch_size=64, device="cpu", progress=False)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "out of memory with 64 images per forward pass; retrying with 32" in done.stderr
    for got, want in zip(_features(tmp_path / "capped"), _features(tmp_path / "warm")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("content", ["text", "empty", "list", "passwd"])
def test_files_that_are_not_weights_are_one_line(run_cli, tmp_path, content):
    path = tmp_path / "notes.txt"
    if content == "text":
        path.write_text("these are my notes\n")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "list":
        torch.save([torch.zeros(2), 3], path)
    else:
        path = "/etc/passwd"
    result = run_cli("extract", "--model", "resnet18", "--resolution", "32", "--dataset", "sample", "--weights", path)
    assert_one_line_error(result, "not a PyTorch", "state dict", "torch.save")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))


def test_a_pickle_that_is_not_weights_is_one_line(run_cli, tmp_path):
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps(["a", "list"]))
    result = run_cli("extract", "--model", "resnet18", "--resolution", "32", "--dataset", "sample", "--weights", path)
    assert_one_line_error(result, "not a PyTorch checkpoint or state dict")


def test_a_train_only_folder_extracts_fits_on_a_held_out_split_and_predicts(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=10)
    assert not (data / "test").exists()
    args = [*TINY, "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    result = run_cli("fit", *args, "--head", "logreg", "--json", "--out", "run")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n_test"] == 20 and metrics["n_train"] == 80  # 2 of each class's 10 held out
    assert metrics["test_split"].startswith("held out of train: 0.2")
    # The held-out rows are not among the rows the head (and so its sweep) is fitted on.
    [path] = (tmp_path / "cache").glob("*.h5")
    _, X, y, Xt, yt, _ = select(open_cache(path), seed=0)
    assert len(X) == 80 and len(Xt) == 20 and not {r.tobytes() for r in X} & {r.tobytes() for r in Xt}
    assert np.bincount(yt).tolist() == [2] * 10
    other = run_cli("fit", *args, "--head", "knn", "--test-fraction", "0.5", "--json")
    assert json.loads(other.stdout)["n_test"] == 50
    image = next((data / "train" / "cat").iterdir())
    assert run_cli("predict", "--head", tmp_path / "run", image).exit_code == 0
    assert_one_line_error(run_cli("fit", "--features", next((tmp_path / "cache").glob("*.h5")), "--test-fraction", "1.5"),
                          "--test-fraction")


def test_cache_verify_and_ls_agree_on_a_missing_folder(run_cli, tmp_path):
    assert_one_line_error(run_cli("cache", "ls", "--cache-dir", tmp_path / "missing"), "no cache folder")
    assert_one_line_error(run_cli("cache", "verify", "--cache-dir", tmp_path / "missing"), "no cache folder")


def test_cache_ls_shows_leftovers_of_dead_runs_and_rm_removes_them(run_cli, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "x__resnet18__none__r32__float32__0123456789.h5.tmp").write_bytes(b"half")
    (cache / "y__resnet18__none__r32__float32__0123456789.h5.lock").write_bytes(b"")
    listing = run_cli("cache", "ls", "--cache-dir", cache)
    assert listing.exit_code == 0
    assert sum(line.startswith("leftover") for line in listing.output.splitlines()) == 2
    for leftover in list(cache.iterdir()):
        assert run_cli("cache", "rm", leftover).exit_code == 0
    assert list(cache.iterdir()) == []
