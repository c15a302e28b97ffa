"""Faults of the machine, injected for real: a full or read-only disk (tmpfs mounts, as root), an
allocation that cannot succeed, files that are not weights, and folders without a test split."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, copy_sample
from probe.cache import open_cache
from probe.selection import select
from probe.runs import load_head

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
    assert_one_line_error(run_cli(*args), "not enough disk space", "head.json")
    assert not (disk / "run" / "head.json").exists() and not (disk / "run" / "metrics.json").exists()
    assert _leftovers(disk) == []
    remount(disk, "size=4m")
    assert run_cli(*args).exit_code == 0
    assert load_head(disk / "run")["model"] == "resnet18"


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
    _, X, y, Xt, yt, _, _ = select(open_cache(path), seed=0)
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


def test_read_only_folders_that_exist_are_one_line_everywhere_and_a_complete_cache_is_still_read(
        run_cli, small_disk, data, tmp_path):
    """Found by trying to break the above: an existing folder on a read-only disk, for every writer."""
    mount, remount = small_disk
    args = [*TINY, "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--head", "knn", "--out", "run").exit_code == 0
    disk = mount(8_000_000)
    for folder in ("c", "run", "cmp", "plot"):
        (disk / folder).mkdir()
    [cache_file] = (tmp_path / "cache").glob("*.h5")
    (disk / "c" / cache_file.name).write_bytes(cache_file.read_bytes())
    remount(disk, "ro")
    assert "cache hit" in run_cli("extract", *args, "--cache-dir", disk / "c").output  # read, not locked
    assert_one_line_error(run_cli("extract", *args, "--cache-dir", disk / "c", "--force"), "Read-only")
    assert_one_line_error(run_cli("fit", *args, "--head", "knn", "--out", disk / "run"), "Read-only")
    assert_one_line_error(run_cli("compare", "run", "--out", disk / "cmp"), "Read-only")
    assert_one_line_error(run_cli("compare", "run", "--out", "cmp", "--plot", disk / "plot"), "Read-only")
    assert_one_line_error(run_cli("cache", "rm", disk / "c" / cache_file.name), "cannot remove", "Read-only")


def test_a_full_disk_for_compare_plots_is_one_line(run_cli, small_disk, data):
    mount, _ = small_disk
    args = [*TINY, "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--head", "knn", "--out", "run").exit_code == 0
    disk = mount(40_000)
    assert_one_line_error(run_cli("compare", "run", "--plot", disk / "plot"), "not enough disk space", "accuracy.png")
    assert _leftovers(disk) == []


def test_bad_weights_leave_no_lock_file_and_a_leftover_is_removed_alone(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("notes")
    data = copy_sample(tmp_path / "d", per_class=2, test_per_class=1)
    result = run_cli("extract", "--model", "resnet18", "--resolution", "32", "--dataset", f"folder:{data}",
                     "--weights", "notes.txt")
    assert_one_line_error(result, "not a PyTorch checkpoint")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing written, not even the lock
    assert run_cli("extract", *TINY, "--dataset", f"folder:{data}").exit_code == 0
    [cache_file] = (tmp_path / "cache").glob("*.h5")
    leftover = cache_file.with_name(cache_file.name + ".tmp")
    leftover.write_bytes(b"half")
    assert run_cli("cache", "rm", leftover).exit_code == 0
    assert not leftover.exists() and cache_file.exists()  # the complete cache beside it stays


def test_a_state_dict_with_another_classifier_or_inside_a_checkpoint_loads(tmp_path):
    import torchvision

    from probe.backbones import create_backbone

    torch.manual_seed(3)
    trained = torchvision.models.resnet18(num_classes=10)  # fine-tuned for 10 classes: fc of another shape
    torch.save({"model": trained.state_dict(), "epoch": 7}, tmp_path / "ckpt.pt")
    net = create_backbone("resnet18", str(tmp_path / "ckpt.pt"), 32)
    x = torch.rand(2, 3, 32, 32)
    trained.fc = torch.nn.Identity()
    with torch.inference_mode():
        torch.testing.assert_close(net(x), trained.eval()(x))


def test_selected_classes_without_test_images_and_bad_numbers_are_one_line(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=3, test_per_class=1, classes=["cat", "dog", "frog"])
    for f in [*(data / "test" / "dog").iterdir(), *(data / "test" / "frog").iterdir()]:
        f.unlink()
    args = [*TINY, "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    assert_one_line_error(run_cli("fit", *args, "--classes", "dog,frog"), "no test images of the selected classes")
    assert_one_line_error(run_cli("finetune", *args, "--classes", "dog,frog", "--epochs", "1"),
                          "no test images of the selected classes")
    for option, value in (("--C", "inf"), ("--epochs", "0"), ("--seed", "-1")):
        assert_one_line_error(run_cli("fit", *args, "--head", "linear", option, value), option)
    assert_one_line_error(run_cli("fit", *args, "--seed", "-1", "--train-per-class", "2"), "--seed")
    assert_one_line_error(run_cli("finetune", *args, "--seed", "-1", "--epochs", "1"), "--seed")
    assert not (tmp_path / "runs").exists()


def test_a_decompression_bomb_is_named_and_the_other_images_are_predicted(run_cli, sample_cache, tmp_path):
    from PIL import Image

    from probe.datasets import SAMPLE_DIR
    from probe.fit import fit

    fit(features=str(sample_cache), head="knn", out=str(tmp_path / "run"))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)  # a tiny file whose pixels would take 2.7 GB as RGB
    image = SAMPLE_DIR / "test" / "cat" / "0000.jpg"
    result = run_cli("predict", "--head", tmp_path / "run", bomb, image)
    assert result.exit_code == 2 and "bomb.png" in result.stderr and "Traceback" not in result.output
    assert result.stdout.startswith(str(image))


def test_finetune_on_a_train_only_folder_records_its_held_out_split(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=4, classes=["cat", "dog"])
    result = run_cli("finetune", *TINY, "--dataset", f"folder:{data}", "--strategy", "linear", "--epochs", "1",
                     "--test-fraction", "0.5", "--json", "--out", "ft")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n_test"] == 4 and metrics["n_train"] == 4 and "0.5 of each class" in metrics["test_split"]
