"""ImageNet-1k and its shift sets in their published layouts, and one ImageNet head scored on each with
its logits restricted to the set's classes (probe.shift)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import layouts
from conftest import assert_one_line_error
from probe.datasets import load_dataset
from probe.datasets.imagenet import wnids
from probe.errors import ProbeError
from probe.shift import restricted_predictions


@pytest.mark.parametrize("meta", [False, True])
def test_imagenet_reads_as_torchvisions_imagenet(tmp_path, meta):
    import torchvision.datasets as tvd

    layouts.imagenet(tmp_path, meta=meta)
    data = load_dataset("imagenet", tmp_path, download=False)
    if not meta:  # torchvision's reader needs its meta.bin: write it now, for the reference only
        layouts.imagenet(tmp_path / "ref", meta=True)
    for split, folder in (("train", "train"), ("test", "val")):
        ref = tvd.ImageNet(str(tmp_path / ("imagenet" if meta else "ref/imagenet")), split=folder)
        assert data.wnids == ref.wnids == layouts.IMAGENET_WNIDS
        assert data.classes == [names[0] for names in ref.classes]  # "tench", "goldfish", ...
        paths = [p.replace(str(tmp_path / "ref"), str(tmp_path)) for p, _ in ref.samples]
        assert data.splits[split].images.paths == paths
        assert data.splits[split].labels.tolist() == [lab for _, lab in ref.samples]
    assert data.protocol.startswith("official: train (1,281,167), val (50,000)")


def test_imagenet_without_its_files_says_where_they_come_from(tmp_path):
    with pytest.raises(ProbeError, match="ILSVRC2012_img_train.tar"):
        load_dataset("imagenet", tmp_path, download=True)
    assert not (tmp_path / "imagenet").exists()


def test_the_class_order_is_the_one_the_shift_sets_index():
    import timm  # its tables hold hendrycks' indices_in_1k of ImageNet-R and -A

    info = Path(timm.__file__).parent / "data" / "_info"
    for name in ("imagenet_r", "imagenet_a"):
        synsets = (info / f"{name}_synsets.txt").read_text().split()
        indices = [int(i) for i in (info / f"{name}_indices.txt").read_text().split()]
        assert [wnids().index(s) for s in synsets] == indices


def test_shift_sets_read_their_layouts(tmp_path):
    expected = layouts.imagenet_shifts(tmp_path)
    order = wnids()
    v2 = load_dataset("imagenet_v2", tmp_path, download=False)
    assert v2.groups == [[w] for w in layouts.IMAGENET_WNIDS] and len(v2.splits["test"]) == 8
    assert "train" not in v2.splits
    assert [order.index(g[0]) for g in v2.groups] == sorted(order.index(w) for w in layouts.IMAGENET_WNIDS)
    for name in ("imagenet_r", "imagenet_a"):
        data = load_dataset(name, tmp_path, download=False)
        assert data.groups == [[w] for w in layouts.IMAGENET_WNIDS[1:]] and data.classes[0] == "goldfish"
    assert len(load_dataset("imagenet_sketch", tmp_path, download=False).splits["test"]) == 8
    objectnet = load_dataset("objectnet", tmp_path, download=False)
    assert objectnet.classes == expected["objectnet"]["classes"] and objectnet.groups == expected["objectnet"]["groups"]
    assert len(objectnet.splits["test"]) == 4  # the chair folder maps to no ImageNet class: not scored
    from PIL import Image

    stored = np.array(Image.open(objectnet.splits["test"].images.paths[0]).convert("RGB"))
    np.testing.assert_array_equal(objectnet.splits["test"].read(0), stored[2:-2, 2:-2])  # ObjectNet's border crop
    with pytest.raises(ProbeError, match="imagenet-r.tar"):
        load_dataset("imagenet_r", tmp_path / "empty", download=False)


def test_restricting_changes_the_answer_and_maps_back_to_the_heads_classes():
    columns = ["n1", "n2", "n3", "n4", "n5"]  # the head's probability columns
    groups = [["n2"], ["n4"]]  # a 2-class subset set: its class 0 is ImageNet's n2, class 1 is n4
    p = np.array([[0.50, 0.10, 0.05, 0.30, 0.05],  # unrestricted argmax n1 (not in the set): restricted, n4
                  [0.05, 0.40, 0.45, 0.05, 0.05]])  # argmax n3 (not in the set): restricted, n2
    assert restricted_predictions(p, columns, groups).tolist() == [1, 0]
    # The mistake of mixing index spaces: the argmax of the restricted columns is 0 or 1, which as a column of
    # the head would be n1 or n2. The function returns set classes, reached only through the column's id.
    assert np.argmax(p[:, [1, 3]], 1).tolist() == [1, 0] and np.argmax(p, 1).tolist() == [0, 2]
    # A group of several ImageNet classes (ObjectNet): any of them is the group.
    assert restricted_predictions(p, columns, [["n1", "n2"], ["n3", "n4"]]).tolist() == [0, 1]
    with pytest.raises(ProbeError, match="does not know ImageNet class n9"):
        restricted_predictions(p, columns, [["n9"]])


@pytest.fixture(scope="module")
def imagenet_world(tmp_path_factory):
    from probe.extract import extract

    root = tmp_path_factory.mktemp("imagenet")
    layouts.imagenet(root, n_train=6, n_val=2)
    layouts.imagenet_shifts(root)
    base = dict(model="resnet18", weights="none", resolution=32, data_dir=str(root), cache_dir=str(root / "cache"),
                progress=False)
    caches = {name: extract(dataset=name, **base).path for name in ("imagenet", "imagenet_r", "imagenet_v2", "objectnet")}
    return root, caches


def test_fit_eval_scores_the_head_on_each_shift_set_restricted(imagenet_world, run_cli):
    from probe.runs import load_head

    root, caches = imagenet_world
    result = run_cli("fit", "--model", "resnet18", "--weights", "none", "--resolution", 32, "--dataset", "imagenet",
                     "--data-dir", root, "--cache-dir", root / "cache", "--eval", "imagenet_r,imagenet_v2,objectnet")
    assert result.exit_code == 0, result.output
    assert "| imagenet | imagenet_r | imagenet_v2 | objectnet |" in result.output
    folder = Path(result.output.strip().splitlines()[-1].removeprefix("saved "))  # relative to the working folder
    m = json.loads((folder / "metrics.json").read_text())
    head = load_head(folder)["pipeline"]
    for name in ("imagenet_r", "imagenet_v2", "objectnet"):
        with h5py.File(caches[name]) as f:
            X, y, groups = f["test/features"][...], f["test/labels"][...], json.loads(f.attrs["groups"])
        p = head.predict_proba(X)  # columns: the fixture's four classes, in ImageNet's order
        allowed = [c for c, w in enumerate(layouts.IMAGENET_WNIDS) if any(w in g for g in groups)]
        picked = np.array(allowed)[p[:, allowed].argmax(1)]
        truth = [[layouts.IMAGENET_WNIDS.index(w) for w in g] for g in groups]
        right = [picked[i] in truth[y[i]] for i in range(len(y))]
        assert m["shift"][name]["test_accuracy"] == pytest.approx(np.mean(right)), name
        anywhere = [p[i].argmax() in truth[y[i]] for i in range(len(y))]  # the argmax over every class
        assert m["shift"][name]["test_accuracy_unrestricted"] == pytest.approx(np.mean(anywhere)), name
        assert m["shift"][name]["n_classes"] == len(groups)
    assert m["identity"]["evaluate"][0]["dataset"] == "imagenet_r"


def test_eval_refuses_what_it_cannot_score(imagenet_world, run_cli, tmp_path):
    root, caches = imagenet_world
    common = ["--model", "resnet18", "--weights", "none", "--resolution", 32, "--data-dir", root, "--cache-dir",
              root / "cache"]
    assert_one_line_error(run_cli("fit", *common, "--dataset", "imagenet", "--eval", "imagenet_a"),
                          "probe extract --dataset imagenet_a")
    assert_one_line_error(run_cli("fit", *common, "--dataset", "imagenet", "--eval", "cifar10"), "--eval cifar10")
    assert_one_line_error(run_cli("fit", "--features", caches["imagenet_r"]), "--eval imagenet_r")
    assert_one_line_error(run_cli("fit", "--features", caches["imagenet"], "--classes", "tench,goldfish",
                                  "--eval", "imagenet_v2"), "does not know ImageNet class")


def test_the_suite_takes_shift_sets_as_columns(imagenet_world, run_cli):
    root, _ = imagenet_world
    result = run_cli("suite", "--models", "resnet18", "--datasets", "imagenet", "--weights", "none", "--resolution", 32,
                     "--data-dir", root, "--cache-dir", root / "cache", "--eval", "imagenet_r,objectnet", "--out",
                     root / "suite")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("| model"))
    assert header.split(" | ")[2:5] == ["imagenet", "imagenet_r", "objectnet"]
