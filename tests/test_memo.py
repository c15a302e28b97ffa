"""The memo of file reads (probe/memo.py): a folder's content fingerprint and a tar shard index are read
from it while the files are unchanged, and never once a file has changed, whatever its size and
modification time."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from probe import memo
from probe.datasets import SAMPLE_DIR, load_dataset
from probe.datasets.base import files_fingerprint
from probe.datasets.wds import index_shards
from test_wds import write_shards


@pytest.fixture
def settled_now(monkeypatch, tmp_path):
    """Files written by the test count as settled at once, and the memo is the test's own."""
    monkeypatch.setattr(memo, "SETTLED_SECONDS", -60.0)
    monkeypatch.setenv("PROBE_MEMO_DIR", str(tmp_path / "memo"))
    return tmp_path / "memo"


def small_folder(root):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SAMPLE_DIR / split / cls).glob("*.jpg"))[:3]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def test_an_unchanged_folder_takes_its_fingerprint_from_the_memo(settled_now, tmp_path):
    root = small_folder(tmp_path / "photos")
    first = load_dataset(f"folder:{root}").fingerprint
    [kept] = list(settled_now.iterdir())
    assert kept.read_bytes() == first.encode()
    kept.write_bytes(b"0123456789abcdef")  # what the memo says is what is used: the files are not read again
    assert load_dataset(f"folder:{root}").fingerprint == "0123456789abcdef"
    kept.write_bytes(b"not a fingerprint")  # a damaged memo is ignored, and the files read
    assert load_dataset(f"folder:{root}").fingerprint == first


def test_a_file_rewritten_with_its_old_size_and_time_is_read_again(settled_now, tmp_path):
    root = small_folder(tmp_path / "photos")
    first = load_dataset(f"folder:{root}").fingerprint
    image = next((root / "train" / "cat").iterdir())
    st = os.stat(image)
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF  # the same size
    time.sleep(0.05)  # past the file system's clock tick
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    assert os.stat(image).st_size == st.st_size and os.stat(image).st_mtime_ns == st.st_mtime_ns
    assert load_dataset(f"folder:{root}").fingerprint != first


def test_files_that_just_changed_are_not_remembered(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBE_MEMO_DIR", str(tmp_path / "memo"))
    root = small_folder(tmp_path / "photos")  # written a moment ago
    load_dataset(f"folder:{root}")
    assert not (tmp_path / "memo").exists()
    sample = [(f.name, f) for f in sorted((SAMPLE_DIR / "train" / "cat").glob("*.jpg"))[:5]]  # settled long ago
    files_fingerprint(sample)
    assert len(list((tmp_path / "memo").iterdir())) == 1


def test_an_unwritable_memo_folder_is_no_error(settled_now, tmp_path):
    settled_now.parent.mkdir(exist_ok=True)
    settled_now.write_text("a file where the folder would be")
    root = small_folder(tmp_path / "photos")
    assert load_dataset(f"folder:{root}").fingerprint == load_dataset(f"folder:{root}").fingerprint


def test_the_shard_index_is_kept_and_a_damaged_one_read_again(settled_now, tmp_path):
    root = write_shards(tmp_path / "wds", per_shard=100)
    paths = sorted(str(p) for p in root.glob("sample-test-*.tar"))
    images, labels = index_shards(paths)
    [kept] = list(settled_now.iterdir())
    again, labels_again = index_shards(paths)
    assert again.keys == images.keys and np.array_equal(again.members, images.members)
    assert np.array_equal(labels_again, labels) and again.read(7).shape == images.read(7).shape
    kept.write_bytes(kept.read_bytes()[:100])  # cut short
    third, labels_third = index_shards(paths)
    assert third.keys == images.keys and np.array_equal(labels_third, labels)
