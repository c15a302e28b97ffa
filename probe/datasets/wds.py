"""WebDataset shards: `wds:PATTERN`, tar files of samples whose members share a key (`000123.jpg`,
`000123.cls`), the layout large image sets are stored in (ImageNet as `imagenet-train-{0000..1023}.tar`).

PATTERN takes brace ranges and lists (`{0000..1023}`, `{a,b}`) and shell wildcards. The test split is
`--test-shards PATTERN` (never a training shard), or else the shards the pattern names with `train`
replaced by `test` (or `val`) in the file name and its braces by wildcards (train-{0000..1023}.tar ->
test-*.tar), where there are any. A sample's
image is its first member with an image extension and its label the integer in its `.cls` member;
class names come from `--class-names FILE` (a JSON list), else a `classes.json` beside the shards,
else the label numbers.

The shards are indexed once (the offset and size of every member, read from the tar headers, and kept
in probe's memo while the shards are unchanged), so they are read like any other data set: by row, in
DataLoader workers, each rank its own rows, and a run killed midway resumes from its last shard of
features. Members are read with os.pread (no shared file offset after the fork into workers).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from probe import memo
from probe.datasets.base import HELD_OUT, ImageDataset, Split, decode_image, files_fingerprint
from probe.errors import ProbeError

MAX_SHARDS = 1_000_000  # a brace range wider than this is a typo, not a data set
MAX_CLASSES = 1 << 20  # a class number past this is a damaged label (ImageNet-21k has 21,841 classes)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def expand(pattern: str) -> list[str]:
    """Shard paths of a pattern: brace ranges {0000..0099} (zero-padded as written), lists {a,b}, wildcards."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m:
        inner = m[1]
        if ".." in inner:
            lo, hi = inner.split("..", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) - int(lo) >= MAX_SHARDS:
                raise ProbeError(f"{pattern}: {{{inner}}} is not a range of shard numbers (such as {{0000..1023}}, "
                                 f"at most {MAX_SHARDS:,} shards)")
            width = len(lo) if lo.startswith("0") else 0
            items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            items = inner.split(",")
        return [p for item in items for p in expand(pattern[:m.start()] + item + pattern[m.end():])]
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(os.path.expanduser(pattern)))
    return [os.path.expanduser(pattern)]


class TarImages:
    """The images of samples in tar shards, read by (shard, offset, size) and decoded on access."""

    def __init__(self, shards: list[str], members: np.ndarray, keys: list[str]):
        self.shards, self.members, self.keys = shards, members, keys  # members: int64 [N, 3] shard, offset, size
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.members)

    def read(self, i: int) -> np.ndarray:
        shard, offset, size = (int(v) for v in self.members[i])
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
            except OSError as e:
                raise ProbeError(f"cannot read shard {self.shards[shard]}: {e.strerror}") from None
        return decode_image(os.pread(fd, size, offset), self.name(i))

    def name(self, i: int) -> str:
        return f"{self.keys[i]} in {self.shards[int(self.members[i, 0])]}"

    def subset(self, rows) -> "TarImages":
        rows = np.asarray(rows, dtype=np.int64)
        return TarImages(self.shards, self.members[rows], [self.keys[i] for i in rows])

    def __getstate__(self) -> dict:  # file descriptors are per process
        return {**self.__dict__, "_fds": {}}


def index_shards(shards: list[str]) -> tuple[TarImages, np.ndarray]:
    """Each sample's image member and its .cls label, from one pass over the shards' tar headers, or
    from the memo of that pass while the shards are unchanged (probe/memo.py)."""
    key, settled = memo.signature("wds_index", [(p, p) for p in shards])
    known = _unpack_index(memo.get(key), len(shards))
    if known is not None:
        members, keys, labels = known
        return TarImages(shards, members, keys), labels
    images, labels = _read_index(shards)
    if settled:
        buffer = io.BytesIO()
        np.savez(buffer, members=images.members, keys=np.asarray(images.keys, dtype=str), labels=labels)
        memo.put(key, buffer.getvalue())
    return images, labels


def _unpack_index(data: bytes | None, n_shards: int):
    """(members, keys, labels) of a memo written by index_shards, or None if it is absent or damaged."""
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            members, keys, labels = z["members"], z["keys"].tolist(), z["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    whole = (members.ndim == 2 and members.shape[1] == 3 and len(members) == len(keys) == len(labels) > 0
             and members.dtype == np.int64 and labels.dtype == np.int64 and 0 <= members[:, 0].min()
             and members[:, 0].max() < n_shards)
    return (members, keys, labels) if whole else None


def _read_index(shards: list[str]) -> tuple[TarImages, np.ndarray]:
    members, keys, labels = [], [], []
    for s, path in enumerate(shards):
        try:
            with tarfile.open(path, "r:") as tar:
                samples: dict[str, dict] = {}
                order = []
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, base = info.name.rpartition("/")
                    stem, _, ext = base.partition(".")  # webdataset's rule: the extension is after the first dot
                    key = f"{folder}/{stem}" if folder else stem
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][ext.lower()] = info
                for key in order:
                    sample = samples[key]
                    image = next((sample[e] for e in IMAGE_KEYS if e in sample), None)
                    if image is None:
                        continue  # a sample without an image (metadata only): not an image sample
                    if "cls" not in sample:
                        raise ProbeError(f"sample {key} in {path} has no .cls label member")
                    labels.append(_label(tar.extractfile(sample["cls"]).read(), key, path))
                    members.append((s, image.offset_data, image.size))
                    keys.append(key)
                _check_end(tar, path)
        except (OSError, tarfile.TarError) as e:
            raise ProbeError(f"cannot read shard {path} ({type(e).__name__}: {e}); is it a tar file?") from None
    if not members:
        raise ProbeError(f"no image samples in {len(shards)} shard(s) ({shards[0]}, ...)")
    return TarImages(shards, np.asarray(members, dtype=np.int64), keys), np.asarray(labels, dtype=np.int64)


def _label(data: bytes, key: str, path: str) -> int:
    text = data.decode(errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise ProbeError(f"sample {key} in {path}: its .cls is {text[:40]!r}, not a class number") from None
    if not 0 <= label < MAX_CLASSES:
        raise ProbeError(f"sample {key} in {path}: its .cls is {label}; class numbers run from 0 to at most "
                         f"{MAX_CLASSES - 1:,}")
    return label


def _check_end(tar: tarfile.TarFile, path: str) -> None:
    """Python's tarfile ends its listing quietly at a header cut short or damaged after the first member;
    a whole tar ends in a block of zeros there, so anything else is a shard cut short, said in one line."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise ProbeError(f"shard {path} is cut short or damaged at byte {tar.offset:,} (no end-of-archive block "
                         f"there); copy it again")


def load(spec: str, data_dir: Path, download: bool, options: dict) -> ImageDataset:
    train = expand(spec)
    missing = [p for p in train if not os.path.isfile(p)]
    if not train or missing:
        raise ProbeError(f"wds:{spec}: no shard {missing[0] if missing else spec} (give a pattern of existing tar "
                         "files, e.g. wds:/data/train-{0000..0099}.tar)")
    test_pattern = options.get("test_shards")
    folder, _, file_part = spec.rpartition("/")
    if test_pattern is None and "train" in file_part:  # the naming convention, in the file name only (a folder
        for other in ("test", "val"):                 # named training/ or pretrained_wds/ is not a split name)
            candidate = (f"{folder}/" if folder else "") + re.sub(r"\{[^{}]*\}", "*", file_part.replace("train", other))
            if expand(candidate):
                test_pattern = candidate
                break
    test = expand(test_pattern) if test_pattern else []
    if test_pattern and not test:
        raise ProbeError(f"--test-shards {test_pattern}: no shard matches it")
    shared = sorted({os.path.realpath(p) for p in train} & {os.path.realpath(p) for p in test})
    if shared:
        raise ProbeError(f"the test shards and the training shards share {len(shared)} shard(s) ({shared[0]}, ...): a "
                         "test split must not hold training images; give --test-shards a pattern of other shards")
    splits, places = {}, []
    for name, shards in (("train", train), ("test", test)):
        if not shards:
            continue
        if len(set(shards)) < len(shards):
            twice = next(p for p, n in Counter(shards).items() if n > 1)
            raise ProbeError(f"the {name} pattern names shard {twice} twice")
        if any(not os.path.isfile(p) for p in shards):
            raise ProbeError(f"--test-shards {test_pattern}: no shard {next(p for p in shards if not os.path.isfile(p))}")
        images, labels = index_shards(shards)
        splits[name] = Split(labels, images=images)
        places += [(f"{name}/{Path(p).name}", p) for p in shards]
    classes = _class_names(options.get("class_names"), train[0], int(max(s.labels.max() for s in splits.values())) + 1)
    for name, split in splits.items():
        if split.labels.min() < 0 or split.labels.max() >= len(classes):
            raise ProbeError(f"wds:{spec}: {name} labels run {split.labels.min()}..{split.labels.max()}, but there are "
                             f"{len(classes)} class names")
    protocol = f"the shards of {test_pattern}" if "test" in splits else HELD_OUT
    canonical = f"wds:{os.path.abspath(os.path.expanduser(spec))}"
    # The class names are the data set's too: new names give another cache (the shards say only numbers).
    fingerprint = hashlib.sha256((files_fingerprint(places) + json.dumps(classes)).encode()).hexdigest()[:16]
    return ImageDataset(canonical, classes, splits, fingerprint, protocol)


def _class_names(path: str | None, first_shard: str, n: int) -> list[str]:
    beside = Path(first_shard).parent / "classes.json"
    source = Path(path).expanduser() if path else beside if beside.is_file() else None
    if source is None:
        return [str(i) for i in range(n)]
    try:
        names = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise ProbeError(f"class names {source}: {type(e).__name__}: {e}; give a JSON list of names") from None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise ProbeError(f"class names {source} is not a JSON list of strings")
    return names
