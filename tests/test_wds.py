"""WebDataset shards (issue 14): tar shards written from the bundled sample by webdataset's own TarWriter,
read by probe's indexed reader. The samples are what webdataset's own reader yields; the features
equal the folder's they came from, bit for bit, in one process and under torchrun."""

from __future__ import annotations

import io
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


def one_sample_shard(path: Path, cls: bytes) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.jpg", next((SAMPLE_DIR / "train" / "cat").glob("*.jpg")).read_bytes()), ("a.cls", cls)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("cls, words", [(b"\xff\xfe", "not a class number"), (b"cat", "not a class number"),
                                        (b"99999999999999999999999", "class numbers run from 0"),
                                        (b"300000000", "class numbers run from 0"), (b"-1", "class numbers run from 0")])
def test_a_bad_label_is_one_line(tmp_path, run_cli, cls, words):
    shard = one_sample_shard(tmp_path / "s-train-0.tar", cls)
    assert_one_line_error(run_cli("extract", "--dataset", f"wds:{shard}", "--weights", "none"), words)


def test_bad_patterns_and_shards_cut_short_are_one_line(shards, tmp_path, run_cli):
    extract_ = ("extract", "--weights", "none", "--model", "resnet18", "--dataset")
    for pattern in ("train-{a..c}.tar", "train-{00..}.tar", "train-{00..99999999}.tar"):
        assert_one_line_error(run_cli(*extract_, f"wds:{shards}/sample-{pattern}"), "is not a range of shard numbers")
    assert_one_line_error(run_cli(*extract_, f"wds:{shards}/sample-train-{{0000..0001}}{{,}}.tar"), "twice")
    assert_one_line_error(run_cli(*extract_, f"wds:{shards}/sample-train-0000.tar", "--test-shards",
                                  f"{shards}/nothing-*.tar"), "--test-shards", "no shard matches")
    whole = (shards / "sample-train-0000.tar").read_bytes()
    with tarfile.open(shards / "sample-train-0000.tar") as tar:
        header = tar.getmembers()[20].offset  # where a sample's header starts, after whole members
    for cut in (header, header + 100):  # at a header and inside one: tarfile itself ends its listing quietly
        short = tmp_path / f"cut{cut}-train-0000.tar"
        short.write_bytes(whole[:cut])
        assert_one_line_error(run_cli(*extract_, f"wds:{short}"), "cut short")
    assert not list(Path("cache").glob("*.h5"))


def test_other_class_names_give_another_cache(shards, tmp_path):
    base = dict(dataset=f"wds:{shards}/sample-train-0000.tar", **MODEL, cache_dir=str(tmp_path / "cache"), progress=False)
    first = extract(**base).path
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"c{i}" for i in range(10)]))
    second = extract(**base, data_options={"class_names": str(names)}).path
    assert second != first and open_cache(second).classes[0] == "c0"
