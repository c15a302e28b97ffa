"""Fixtures: small real data (the bundled sample, generated folders, a CIFAR-10 copy in torchvision's
on-disk format) and real caches made by the real extractor. Nothing here is mocked."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from probe.cli import main
from probe.datasets import SAMPLE_DIR
from probe.extract import extract

@pytest.fixture(scope="session", autouse=True)
def memo_dir(tmp_path_factory) -> Path:
    """The tests' own memo of file fingerprints and shard indexes (probe/memo.py), not the user's."""
    folder = tmp_path_factory.mktemp("memo")
    os.environ["PROBE_MEMO_DIR"] = str(folder)  # the processes the tests start inherit it
    return folder


# The sample through the offline pretrained lite0 at a small resolution: real features, a few seconds.
SAMPLE_RES = 64


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    return extract(model="efficientnet_lite0", dataset="sample", resolution=SAMPLE_RES, cache_dir=str(cache_dir),
                   progress=False).path


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run the real `probe` command in a fresh working folder; returns click's Result."""
    monkeypatch.chdir(tmp_path)

    def run(*args):
        return CliRunner().invoke(main, ["-q", *map(str, args)])
    return run


def assert_one_line_error(result, *words):
    """Exit code 2, one line on stderr starting with 'error:', no traceback, and it names `words`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """An image folder with mixed sizes (small and large) and modes (RGB, L, RGBA, P), JPEG and PNG."""
    root = tmp_path / "mixed"
    specs = [((40, 30), "RGB", "jpg"), ((100, 80), "L", "png"), ((32, 32), "RGBA", "png"), ((70, 120), "P", "png")]
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("ants", "bees")):
            for i in range(n):
                size, mode, ext = specs[(i + c) % len(specs)]
                write_image(root / split / cls / f"{i}.{ext}", size, mode, seed=hash((split, cls, i)) % 2**32)
    return root


def copy_sample(dest: Path, per_class: int, test_per_class: int | None = None, classes=None) -> Path:
    """A folder data set made of the first files of the bundled sample."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        if n is None:
            continue
        for cls_dir in sorted((SAMPLE_DIR / split).iterdir()):
            if classes and cls_dir.name not in classes:
                continue
            for f in sorted(cls_dir.glob("*.jpg"))[:n]:
                target = dest / split / cls_dir.name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
    return dest


@pytest.fixture
def cifar_dir(tmp_path) -> Path:
    """CIFAR-10 in torchvision's on-disk format (pickled batches), made of sample images."""
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    classes = sorted(p.name for p in (SAMPLE_DIR / "train").iterdir())
    rng = np.random.default_rng(0)

    def batch(split, per_class):
        rows, labels = [], []
        for c, cls in enumerate(classes):
            for f in sorted((SAMPLE_DIR / split / cls).glob("*.jpg"))[:per_class]:
                rows.append(np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).reshape(-1))
                labels.append(c)
        order = rng.permutation(len(labels))
        return {"data": np.stack(rows)[order], "labels": [labels[i] for i in order]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch("train", 2)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch("test", 2)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
    return root
