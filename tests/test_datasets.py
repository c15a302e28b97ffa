"""The data set suite (issue 12): every named data set from a fixture written in its real on-disk layout
(tests/layouts.py), read by probe's loader and checked against torchvision's own class on the same
files; Hugging Face data sets from a save_to_disk folder and from parquet files; offline downloads as
one line with nothing left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd

from conftest import assert_one_line_error
from layouts import WRITERS, sample_images
from probe.cache import open_cache
from probe.datasets import NAMED, load_dataset
from probe.errors import ProbeError


def torchvision_reference(name: str, root: Path, monkeypatch) -> dict[str, tuple[list, list]]:
    """{split: (images or paths, labels)} as torchvision's own class reads the fixture, with probe's
    protocol (train + val where it trains on both) applied to its splits. torchvision's check of the
    official files' MD5s, which a fixture cannot have, is switched off for this reference read."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102
    import torchvision.datasets.stl10
    import torchvision.datasets.svhn

    for module in (torchvision.datasets.cifar, torchvision.datasets.flowers102, torchvision.datasets.stl10,
                   torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)
    _trusting = lambda cls: cls  # noqa: E731
    def arrays(data, labels, chw=True):
        data = np.asarray(data)
        return [im for im in (data.transpose(0, 2, 3, 1) if chw else data)], [int(v) for v in labels]

    def files(*parts):
        pairs = [(str(f), int(lab)) for part in parts
                 for f, lab in zip(getattr(part, "_image_files", getattr(part, "_images", None)), part._labels)]
        return [p for p, _ in pairs], [lab for _, lab in pairs]

    r = str(root)
    if name in ("cifar10", "cifar100"):
        cls = _trusting(getattr(tvd, name.upper()))
        return {s: arrays(cls(r, train=s == "train").data, cls(r, train=s == "train").targets, chw=False)
                for s in ("train", "test")}
    if name == "stl10":
        return {s: arrays(_trusting(tvd.STL10)(r, split=s).data, _trusting(tvd.STL10)(r, split=s).labels)
                for s in ("train", "test")}
    if name == "svhn":
        return {s: arrays(_trusting(tvd.SVHN)(r, split=s).data, _trusting(tvd.SVHN)(r, split=s).labels)
                for s in ("train", "test")}
    if name == "flowers102":
        parts = {s: _trusting(tvd.Flowers102)(r, split=s) for s in ("train", "val", "test")}
        return {"train": files(parts["train"], parts["val"]), "test": files(parts["test"])}
    if name == "dtd":
        parts = {s: tvd.DTD(r, split=s) for s in ("train", "val", "test")}
        return {"train": files(parts["train"], parts["val"]), "test": files(parts["test"])}
    if name == "oxford_pets":
        return {"train": files(tvd.OxfordIIITPet(r, split="trainval")), "test": files(tvd.OxfordIIITPet(r, split="test"))}
    if name == "food101":
        return {s: files(tvd.Food101(r, split=s)) for s in ("train", "test")}
    if name == "fgvc_aircraft":
        return {"train": files(tvd.FGVCAircraft(r, split="trainval")), "test": files(tvd.FGVCAircraft(r, split="test"))}
    if name == "gtsrb":
        return {s: ([p for p, _ in tvd.GTSRB(r, split=s)._samples], [lab for _, lab in tvd.GTSRB(r, split=s)._samples])
                for s in ("train", "test")}
    # No official split: the whole data set, which probe's train and test must partition.
    if name == "eurosat":
        samples = tvd.EuroSAT(r).samples
    elif name == "caltech101":
        c = tvd.Caltech101(r)
        samples = [(str(Path(c.root) / "101_ObjectCategories" / c.categories[y] / f"image_{i:04d}.jpg"), y)
                   for y, i in zip(c.y, c.index)]
    else:
        c = tvd.SUN397(r)
        samples = list(zip(map(str, c._image_files), c._labels))
    return {"all": ([p for p, _ in samples], [int(lab) for _, lab in samples])}


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_named_data_set_loads_from_its_real_layout_as_torchvision_reads_it(tmp_path, name, monkeypatch):
    expected = WRITERS[name](tmp_path / "data")
    data = load_dataset(name, data_dir=tmp_path / "data", download=False)
    assert data.classes[:len(expected["classes"])] == expected["classes"]
    if name in ("cifar100", "stl10", "svhn", "flowers102"):  # names fixed by the data set, not read from folders
        assert len(data.classes) == NAMED[name][1]
    assert {s: len(v) for s, v in data.splits.items()} == {"train": expected["train"], "test": expected["test"]}
    assert data.protocol == NAMED[name][3]
    image = data.splits["test"].read(0)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    reference = torchvision_reference(name, tmp_path / "data", monkeypatch)
    ours = {s: data.splits[s] for s in ("train", "test")}
    if "all" in reference:  # a seeded split: train and test partition the data set, per class as the protocol says
        paths = [p for s in ours.values() for p in s.images.paths]
        labels = [int(v) for s in ours.values() for v in s.labels]
        everything = set(zip(*reference["all"]))
        if name == "sun397":  # 50 + 50 of each class: the fixture's 101st image of a class is in neither
            assert set(zip(paths, labels)) < everything and len(everything) - len(paths) == 2
        else:
            assert sorted(zip(paths, labels)) == sorted(everything)
        assert not set(ours["train"].images.paths) & set(ours["test"].images.paths)
        counts = np.bincount(ours["train"].labels)
        assert {"caltech101": set(counts) == {30}, "sun397": set(counts) == {50} and
                set(np.bincount(ours["test"].labels)) == {50}, "eurosat": set(counts) == {4}}[name]
        again = load_dataset(name, data_dir=tmp_path / "data", download=False)
        assert again.splits["train"].images.paths == ours["train"].images.paths  # seeded: the same split every time
        return
    for split, (images, labels) in reference.items():
        assert ours[split].labels.tolist() == labels
        if ours[split].pixels is not None:  # stored as arrays: the same pixels as torchvision's
            np.testing.assert_array_equal(ours[split].pixels, np.stack(images))
        else:
            assert ours[split].images.paths == [str(p) for p in images]


def test_the_fingerprint_changes_with_a_label_and_the_cache_key_with_it(tmp_path):
    WRITERS["food101"](tmp_path / "data")
    before = load_dataset("food101", data_dir=tmp_path / "data").fingerprint
    meta = tmp_path / "data" / "food-101" / "meta" / "train.json"
    content = json.loads(meta.read_text())
    content["baklava"].append(content["apple_pie"].pop())  # one image relabelled
    meta.write_text(json.dumps(content))
    assert load_dataset("food101", data_dir=tmp_path / "data").fingerprint != before


NOT_DOWNLOADED = {"cityscapes": "cityscapes-dataset.com", "imagenet": "ILSVRC2012_img_train.tar",
                  "imagenet_v2": "modestyachts/ImageNetV2", "imagenet_r": "hendrycks/imagenet-r",
                  "imagenet_a": "hendrycks/natural-adv-examples", "imagenet_sketch": "HaohanWang/ImageNet-Sketch",
                  "objectnet": "objectnet.dev"}


@pytest.mark.parametrize("name", [n for n in NAMED if n != "sample"])
def test_a_download_without_network_is_one_line_and_leaves_nothing(tmp_path, name, monkeypatch):
    monkeypatch.setenv("PROBE_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(ProbeError) as e:
        load_dataset(name, data_dir=tmp_path / "data", download=True)
    message = str(e.value)
    if name in NOT_DOWNLOADED:  # an account or a licence stands between: the error says where to get the archives
        assert "\n" not in message and NOT_DOWNLOADED[name] in message
    else:
        assert "\n" not in message and "could not download" in message
        assert "--data-dir" in message and "folder:PATH" in message and "hf:FOLDER" in message
    assert not (tmp_path / "data").exists()  # no empty folder, no partial archive


def test_extract_and_fit_on_a_named_data_set_through_the_cli(tmp_path, run_cli):
    WRITERS["dtd"](tmp_path / "data")
    args = ["--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", "dtd", "--data-dir",
            tmp_path / "data", "--cache-dir", tmp_path / "cache"]
    assert run_cli("extract", *args).exit_code == 0
    cache = open_cache(next((tmp_path / "cache").glob("dtd__*.h5")))
    assert cache.attrs["protocol"] == NAMED["dtd"][3] and cache.attrs["dataset"] == "dtd"
    result = run_cli("fit", *args, "--head", "knn", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[:result.output.rindex("}") + 1])
    assert metrics["test_split"] == NAMED["dtd"][3] and metrics["n_train"] == 12 and metrics["n_test"] == 6
    missing = run_cli("fit", *args[:-4], "--data-dir", tmp_path / "elsewhere", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(missing, "DTD is not in", "--data-dir")


def test_probe_datasets_lists_every_name_with_its_protocol(tmp_path, run_cli):
    WRITERS["svhn"](tmp_path / "data")
    result = run_cli("datasets", "--data-dir", tmp_path / "data")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:len(NAMED) + 1]}
    assert set(lines) == set(NAMED)
    assert " yes " in lines["svhn"] and " yes " not in lines["cifar100"] and "73257" in lines["svhn"]
    assert "seeded" in lines["caltech101"] and "30 images of each class" in lines["caltech101"]


# Hugging Face data sets: a save_to_disk folder and a folder of parquet files, written as a user writes them.

@pytest.fixture
def hf_saved(tmp_path) -> Path:
    import datasets

    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["cat", "dog", "frog"]),
                                  "note": datasets.Value("string")})

    def split(n, offset):
        images = sample_images(n, 40, offset=offset)
        return datasets.Dataset.from_dict({"img": images, "fine": [i % 3 for i in range(n)],
                                           "note": [f"row {i}" for i in range(n)]}, features=features)

    folder = tmp_path / "hf-saved"
    datasets.DatasetDict({"train": split(9, 0), "validation": split(6, 3)}).save_to_disk(str(folder))
    return folder


def test_hf_save_to_disk_folder_finds_its_columns_and_evaluation_split(hf_saved):
    data = load_dataset(f"hf:{hf_saved}")
    assert data.name == f"hf:{hf_saved.resolve()}" and data.classes == ["cat", "dog", "frog"]
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 9, "test": 6}
    assert data.protocol == "the Hugging Face data set's validation split"
    assert data.splits["train"].labels.tolist() == [0, 1, 2] * 3
    expected = np.asarray(sample_images(9, 40)[4])
    decoded = data.splits["train"].read(4)
    assert decoded.shape == expected.shape and np.abs(decoded.astype(int) - expected).mean() < 8  # PNG: lossless
    assert load_dataset(f"hf:{hf_saved}").fingerprint == data.fingerprint


def test_hf_parquet_files_through_extract_fit_and_predict(tmp_path, run_cli):
    import datasets

    folder = tmp_path / "hf-parquet" / "data"
    folder.mkdir(parents=True)
    for split, n in (("train", 12), ("test", 6)):
        images = sample_images(n, 36, offset=n)
        datasets.Dataset.from_dict({"image": images, "label": ["ant", "bee", "wasp"] * (n // 3)},
                                   features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
                                   ).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    args = ["--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", f"hf:{folder.parent}"]
    extracted = run_cli("extract", *args)
    assert extracted.exit_code == 0, extracted.output
    cache = open_cache(next(Path("cache").glob("hf-*.h5")))
    assert json.loads(cache.attrs["classes"]) == ["ant", "bee", "wasp"]  # strings: their sorted values
    assert cache.load("test")[1].tolist() == [0, 1, 2] * 2
    fitted = run_cli("fit", *args, "--head", "logreg")
    assert fitted.exit_code == 0, fitted.output
    image = tmp_path / "one.png"
    sample_images(1, 36)[0].save(image)
    predicted = run_cli("predict", "--head", next(Path("runs").glob("*__logreg__*")), image)
    assert predicted.exit_code == 0 and predicted.output.split(": ")[1].split()[0] in ("ant", "bee", "wasp")


def test_hf_columns_can_be_named_and_bad_ones_are_one_line(hf_saved, run_cli):
    data = load_dataset(f"hf:{hf_saved}", options={"image_column": "img", "label_column": "note"})
    assert len(data.classes) == 9  # every row's note is its own class
    assert_one_line_error(run_cli("extract", "--dataset", f"hf:{hf_saved}", "--label-column", "nope", "--weights", "none"),
                          "no column 'nope'", "img, fine, note")
    assert_one_line_error(run_cli("extract", "--dataset", "sample", "--label-column", "fine", "--weights", "none"),
                          "--label-column is for --dataset hf:")


def test_an_hf_hub_data_set_offline_is_one_line(tmp_path):
    # A fresh process with HF_HUB_OFFLINE=1, as a user sets it (huggingface_hub reads it at import);
    # without it the hub client retries for about 25 s first, with the same one line at the end.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "probe.cli", "extract", "--dataset", "hf:some-user/some-data",
                           "--weights", "none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for words in ("could not load Hugging Face data set", "HF_HUB_OFFLINE", "hf:FOLDER"):
        assert words in lines[0], lines[0]
    assert not list(tmp_path.iterdir())


def test_an_unknown_data_set_names_the_choices(run_cli):
    assert_one_line_error(run_cli("extract", "--dataset", "places365", "--weights", "none"),
                          "unknown data set 'places365'", "cifar100", "sun397", "hf:")
