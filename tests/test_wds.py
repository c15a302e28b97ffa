"""WebDataset shards (issue 14): tar shards written from the bundled sample by webdataset's own TarWriter,
read by probe's indexed reader. The samples are what webdataset's own reader yields; the features
equal the folder's they came from, bit for bit, in one process and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_one_line_error
from probe.cache import open_cache
from probe.datasets import SAMPLE_DIR, load_dataset
from probe.datasets.wds import expand, index_shards
from probe.extract import extract

MODEL = dict(model="resnet18", weights="none", resolution=40)


def write_shards(root: Path, per_shard: int = 250) -> Path:
    """The sample as sample-train-0000..0003.tar and sample-test-0000..0001.tar, in the folder's order."""
    import webdataset as wds

    classes = sorted(p.name for p in (SAMPLE_DIR / "train").iterdir())
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        files = [(f, c) for c, cls in enumerate(classes) for f in sorted((SAMPLE_DIR / split / cls).glob("*.jpg"))]
        for s in range(0, len(files), per_shard):
            with wds.TarWriter(str(root / f"sample-{split}-{s // per_shard:04d}.tar")) as sink:
                for f, c in files[s:s + per_shard]:
                    sink.write({"__key__": f"{classes[c]}/{f.stem}", "jpg": f.read_bytes(), "cls": c})
    (root / "classes.json").write_text(json.dumps(classes))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("wds"))


def test_the_index_reads_what_webdatasets_own_reader_yields(shards):
    import webdataset as wds

    paths = expand(str(shards / "sample-train-{0000..0003}.tar"))
    assert [Path(p).name for p in paths] == [f"sample-train-{i:04d}.tar" for i in range(4)]
    images, labels = index_shards(paths)
    theirs = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in theirs] == images.keys
    assert [int(s["cls"]) for s in theirs] == labels.tolist()
    for i in (0, 333, 999):
        shard, offset, size = images.members[i]
        with open(paths[shard], "rb") as f:
            f.seek(offset)
            assert f.read(size) == theirs[i]["jpg"]  # the very bytes webdataset yields


def test_shards_extract_to_the_folders_features_bit_for_bit(shards, tmp_path):
    data = load_dataset(f"wds:{shards}/sample-train-{{0000..0003}}.tar")
    assert data.classes == sorted(p.name for p in (SAMPLE_DIR / "train").iterdir())  # from classes.json
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 1000, "test": 500}  # train -> test by name
    folder = extract(dataset="sample", cache_dir=str(tmp_path / "folder"), progress=False, **MODEL).path
    tars = extract(dataset=f"wds:{shards}/sample-train-{{0000..0003}}.tar", cache_dir=str(tmp_path / "wds"),
                   progress=False, **MODEL).path
    with h5py.File(folder) as a, h5py.File(tars) as b:
        for name in ("train/features", "test/features", "train/labels", "test/labels"):
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    assert open_cache(tars).attrs["protocol"].startswith("the shards of")


def test_shards_under_torchrun_split_by_rank_and_give_the_same_file(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_SHARD_SECONDS": "0"}
    pattern = f"wds:{shards}/sample-train-{{0000..0003}}.tar"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "probe", "-q", "extract", "--dataset", pattern, "--model", "resnet18", "--weights", "none",
                           "--resolution", "40", "--cache-dir", "c"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    one = extract(dataset=pattern, cache_dir=str(tmp_path / "one"), progress=False, **MODEL).path
    with h5py.File(one) as a, h5py.File(next((tmp_path / "c").glob("*.h5"))) as b:
        np.testing.assert_array_equal(a["train/features"][...], b["train/features"][...])
        np.testing.assert_array_equal(a["test/features"][...], b["test/features"][...])


def test_test_shards_and_class_names_can_be_given(shards, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"c{i}" for i in range(10)]))
    data = load_dataset(f"wds:{shards}/sample-train-0000.tar",
                        options={"test_shards": f"{shards}/sample-test-0001.tar", "class_names": str(names)})
    assert data.classes[0] == "c0" and len(data.splits["test"]) == 250 and len(data.splits["train"]) == 250
    only_train = load_dataset(f"wds:{shards}/sample-*-0000.tar")  # no 'train' in the pattern: one split
    assert set(only_train.splits) == {"train"} and len(only_train.splits["train"]) == 500


def test_bad_shards_are_one_line(shards, tmp_path, run_cli):
    assert_one_line_error(run_cli("extract", "--dataset", f"wds:{tmp_path}/none-{{0000..0002}}.tar", "--weights", "none"),
                          "no shard", "none-0000.tar")
    not_tar = tmp_path / "x-train-0000.tar"
    not_tar.write_bytes(b"plain text, not a tar archive" * 40)
    assert_one_line_error(run_cli("extract", "--dataset", f"wds:{not_tar}", "--weights", "none"), "is it a tar file")
    unlabelled = tmp_path / "u-train-0000.tar"
    with tarfile.open(unlabelled, "w") as tar:
        tar.add(next((SAMPLE_DIR / "train" / "cat").glob("*.jpg")), arcname="a.jpg")
    assert_one_line_error(run_cli("extract", "--dataset", f"wds:{unlabelled}", "--weights", "none"), "no .cls label")
    assert_one_line_error(run_cli("extract", "--dataset", "sample", "--test-shards", "x.tar", "--weights", "none"),
                          "--test-shards is for --dataset wds:")
