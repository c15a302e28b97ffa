"""The HDF5 feature cache: one file per key, written so that an interrupted run never leaves a file
that looks complete.

Layout of a cache file (readable with plain h5py):

    /train/features  [N, D] float32 or float16, chunked
    /train/labels    [N] int64
    /test/...        the same, where the data set has a test split
    attributes       probe_format, complete, key (JSON), key_hash, model, family, pool, weights,
                     weights_path, resolution, preprocessing (JSON: size, resize, interpolation, mode,
                     mean, std), dataset, fingerprint, dtype, feature_dim, classes (JSON),
                     versions (JSON), views, augment, layers (JSON), layer_dims (JSON),
                     protocol (how the test split was made), created

While an extraction runs, finished batches go to `<file>.parts/` as .npy shards, each written to a
temporary name and renamed, so a killed run loses at most the shard in progress and the next run
resumes from the last whole one. The HDF5 file is assembled at the end under a temporary name and
renamed into place: a file with the final name is always complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from probe import identity
from probe.errors import ProbeError
from probe.files import atomic_write, check_space, make_dir, publish

FORMAT = 1
SPLITS = ("train", "test")


def cache_key(*, dataset: str, fingerprint: str, protocol: str, model: str, family: str, weights: str,
              resolution: int, preprocessing: dict, pool: str, dtype: str, precision: str = "fp32",
              compiled: bool = False, views: int = 0, augment: dict | None = None,
              layers: list[str] | None = None, tokens: dict | None = None) -> dict:
    """The identity of a feature cache (probe.identity): everything that changes the features. The data
    (its content fingerprint and the split protocol), the model (family, full name with its pretrained
    tag), the weights' identity, the resolved preprocessing, the pool, the arithmetic of the forward
    pass (precision, torch.compile) and the storage dtype. Augmented views (with their recipe) and
    layers enter only when there are some, and so do token maps (tokens: their grid side, 0 for the
    model's own, and storage dtype)."""
    key = {"dataset": dataset, "fingerprint": fingerprint, "protocol": protocol, "model": model, "family": family,
           "weights": weights, "resolution": resolution, "preprocessing": preprocessing, "pool": pool, "dtype": dtype,
           "precision": precision, "compile": compiled, "probe_format": FORMAT}
    if views:
        key.update(views=views, augment=augment)
    if layers:
        key["layers"] = list(layers)
    if tokens:
        key["tokens"] = dict(tokens)
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """A readable name, e.g. cifar10__resnet18__default__r224__float32__1a2b3c4d5e.h5."""
    dataset = key["dataset"]
    if dataset.startswith("folder:"):
        dataset = "folder-" + Path(dataset[len("folder:"):]).name
    model = key["model"]
    family, _, rest = model.partition(":")
    if rest and ("/" in rest and Path(rest.removeprefix("local-dir:")).is_absolute()):  # a saved folder
        model = f"{family}-{Path(rest.removeprefix('local-dir:')).name}"
    parts = [dataset, model, key["weights"], f"r{key['resolution']}", key["dtype"]]
    parts += [key["precision"]] if key.get("precision", "fp32") != "fp32" else []
    parts += ["compiled"] if key.get("compile") else []
    parts += [key["pool"]] if rest and key.get("pool") else []
    parts += [f"{key['views']}x{key['augment']['kind']}"] if key.get("views") else []
    parts += [f"L{len(key['layers'])}"] if key.get("layers") else []
    parts += [f"tokens{key['tokens']['grid'] or ''}"] if key.get("tokens") else []
    parts.append(key_hash(key))
    return Path(cache_dir) / ("__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts) + ".h5")


class PartialCache:
    """The shards of an unfinished extraction, in `<file>.parts/`."""

    def __init__(self, final: Path, key: dict):
        self.final, self.key = final, key
        self.dir = final.with_name(final.name + ".parts")

    def start(self, resume: bool = True) -> None:
        """Keep shards of an earlier run with the same key, or start empty."""
        if resume and self._key_matches():
            for marker in self.dir.glob("failed-rank*.txt"):  # of a distributed run that stopped
                marker.unlink(missing_ok=True)
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        make_dir(self.dir)
        atomic_write(self.dir / "key.json", json.dumps(self.key, sort_keys=True).encode())

    def _key_matches(self) -> bool:
        try:
            return json.loads((self.dir / "key.json").read_text()) == json.loads(json.dumps(self.key))
        except (OSError, ValueError):
            return False

    def shards(self, split: str) -> list[tuple[int, int, Path]]:
        """(start, stop, path) of the contiguous shards from row 0; a gap or an unreadable shard ends it."""
        found = []
        for p in self.dir.glob(f"{split}-*.npy"):
            m = re.fullmatch(rf"{split}-(\d+)-(\d+)\.npy", p.name)
            if m:
                found.append((int(m[1]), int(m[2]), p))
        contiguous, row = [], 0
        for start, stop, p in sorted(found):
            if start != row:
                break
            contiguous.append((start, stop, p))
            row = stop
        return contiguous

    def rows_done(self, split: str) -> int:
        shards = self.shards(split)
        return shards[-1][1] if shards else 0

    def gaps(self, split: str, start: int, stop: int) -> list[tuple[int, int]]:
        """The row ranges in [start, stop) that no shard covers yet: what a rank still has to do. Shards
        of any rank and of any earlier world size count, so a job resumed with fewer or more ranks
        redoes nothing; new shards start where a gap starts, so shards never overlap."""
        covered = []
        for p in self.dir.glob(f"{split}-*.npy"):
            m = re.fullmatch(rf"{split}-(\d+)-(\d+)\.npy", p.name)
            if m:
                covered.append((int(m[1]), int(m[2])))
        gaps, row = [], start
        for a, b in sorted(covered):
            if b <= row or a >= stop:
                continue
            if a > row:
                gaps.append((row, a))
            row = max(row, b)
        if row < stop:
            gaps.append((row, stop))
        return gaps

    def rows_covered(self, split: str, n: int) -> int:
        return n - sum(b - a for a, b in self.gaps(split, 0, n))

    def fail(self, rank: int, message: str) -> None:
        """Tell the other ranks of a distributed extraction that this one failed, and why."""
        atomic_write(self.dir / f"failed-rank{rank}.txt", message.encode())

    def failure(self) -> str | None:
        """The message of a rank that failed, if one has (checked by the others after every batch)."""
        for marker in sorted(self.dir.glob("failed-rank*.txt")):
            try:
                return f"rank {marker.stem[len('failed-rank'):]}: {marker.read_text()}"
            except OSError:
                continue
        return None

    def write(self, split: str, start: int, features: np.ndarray, tokens: np.ndarray | None = None) -> None:
        """A shard of rows start.. of a split; with tokens, their token maps first, in a shard of their own
        that the features' shard (written last) vouches for."""
        name = f"{split}-{start:09d}-{start + len(features):09d}"
        if tokens is not None:
            atomic_write(self.dir / f"{name}.tokens.npy", lambda f: np.save(f, tokens), size=tokens.nbytes + 128)
        atomic_write(self.dir / f"{name}.npy", lambda f: np.save(f, features),
                     size=features.nbytes + 128)  # .npy: the array and a header of at most 128 bytes

    def finish(self, *, classes: list[str], labels: dict[str, np.ndarray], feature_dim: int, versions: dict,
               weights_path: str = "", layer_dims: dict[str, int] | None = None,
               all_layers: list[str] | None = None, token_shape: tuple[int, int, int] | None = None,
               extra=None) -> Path:
        """Assemble the shards into the final HDF5 file (atomically) and remove them.

        weights_path: the absolute path of the weights file the features came from ("" for default or
        none), so a head fitted on the file can find it again; its content is in the key's weights hash.
        all_layers: every block the model offers to --layers, in depth order (where the stored layers
        stand in the network: `probe depth` places them by it). token_shape: (G, G, C) of the token maps
        (--tokens). extra(h5py file): writes what else belongs in the file (a segmentation set's masks).
        """
        tmp = self.final.with_name(self.final.name + ".tmp")
        # HDF5 cannot survive a write that fails for lack of space (it crashed in testing): check first.
        # The shards stay until the file is in place, so the peak is about twice the cache's size.
        shard_bytes = sum(q.stat().st_size for split in [*labels, *self.view_splits()] for _, _, p in self.shards(split)
                          for q in (p, p.with_suffix(".tokens.npy")) if q.exists())
        check_space(self.final.parent, shard_bytes + sum(8 * len(v) for v in labels.values()) + (1 << 20),
                    f"assembling {self.final.name} (the shards in {self.dir.name} are kept)")
        try:
            self._assemble(tmp, classes, labels, feature_dim, versions, weights_path, layer_dims or {}, all_layers or [],
                           token_shape, extra)
            publish(tmp, self.final)
        except OSError as e:
            raise ProbeError(f"cannot write {self.final}: {e.strerror or str(e).splitlines()[0]}; the shards in "
                             f"{self.dir} are kept: run the same command again once that is fixed") from None
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.final

    def _dtype(self):
        """The dtype the shards hold (the key's storage dtype)."""
        return np.float16 if self.key.get("dtype") == "float16" else np.float32

    def view_splits(self) -> list[str]:
        """The shard series of the augmented training views, view0, view1, ..."""
        return [f"view{v}" for v in range(self.key.get("views", 0))]

    def _assemble(self, tmp: Path, classes, labels, feature_dim, versions, weights_path, layer_dims, all_layers,
                  token_shape=None, extra=None) -> None:
        """Copy the shards into the HDF5 file one at a time (memory-mapped), so assembling a cache takes
        the memory of a shard, not of the whole cache."""
        with h5py.File(tmp, "w") as f:
            def chunked(name, n, width, dtype, lead=()):
                rows = max(1, min(n, (1 << 20) // (width * np.dtype(dtype).itemsize)))
                return f.create_dataset(name, shape=(*lead, n, width), dtype=dtype, chunks=(*(1,) * len(lead), rows, width))

            def copy(split, n, write, kind=""):
                shards = self.shards(split)
                if not shards or shards[-1][1] != n:
                    raise ProbeError(f"{split}: the shards in {self.dir} cover {shards[-1][1] if shards else 0} of "
                                     f"{n} rows; run the same command again to finish them")
                for start, stop, path in shards:
                    if kind:  # the token maps of the same rows
                        path = path.with_suffix(f"{kind}.npy")
                    try:
                        shard = np.load(path, mmap_mode="r")
                        if shard.shape[0] != stop - start:
                            raise ValueError(f"{shard.shape[0]} rows")
                    except (OSError, ValueError):  # a shard cut short or missing: redo from there
                        path.unlink(missing_ok=True)
                        path.with_name(path.name.replace(kind, "")).unlink(missing_ok=True)
                        raise ProbeError(f"shard {path} was damaged and has been removed; run the same command "
                                         "again to resume") from None
                    write(start, stop, shard)

            n_train, dtype = len(labels.get("train", ())), self._dtype()  # a shift set has a test split only
            if self.view_splits():  # train/views [K, N, D]
                views = chunked("train/views", n_train, feature_dim, dtype, lead=(len(self.view_splits()),))
                for v, split in enumerate(self.view_splits()):
                    copy(split, n_train, lambda a, b, x, v=v: views.__setitem__((v, slice(a, b)), x[:, :feature_dim]))
            for split, split_labels in labels.items():
                n = len(split_labels)
                targets = [(chunked(f"{split}/features", n, feature_dim, dtype), 0, feature_dim)]
                start = feature_dim  # the shards hold [final | layer 1 | layer 2 | ...]
                for name, width in layer_dims.items():
                    targets.append((chunked(f"{split}/layers/{name}", n, width, dtype), start, start + width))
                    start += width

                def write(a, b, x, targets=targets):
                    for ds, lo, hi in targets:
                        ds[a:b] = x[:, lo:hi]
                copy(split, n, write)
                if token_shape:  # [N, G * G * C], one image a chunk: one read gives its whole map
                    width = int(np.prod(token_shape))
                    tokens = f.create_dataset(f"{split}/tokens", shape=(n, width), chunks=(1, width),
                                              dtype=np.dtype(self.key["tokens"]["dtype"]))
                    copy(split, n, lambda a, b, x, tokens=tokens: tokens.__setitem__(slice(a, b), x), ".tokens")
                f.create_dataset(f"{split}/labels", data=split_labels.astype(np.int64), chunks=(min(n, 1 << 16),))
            key = self.key
            f.attrs.update({
                "probe_format": FORMAT, "key": json.dumps(key, sort_keys=True), "key_hash": key_hash(key),
                "model": key["model"], "family": key.get("family", ""), "pool": key.get("pool", ""),
                "weights": key["weights"], "resolution": key["resolution"],
                "preprocessing": json.dumps(key["preprocessing"]), "dataset": key["dataset"],
                "fingerprint": key["fingerprint"], "dtype": key["dtype"], "feature_dim": feature_dim,
                "classes": json.dumps(classes), "versions": json.dumps(versions), "weights_path": weights_path,
                "views": key.get("views", 0), "augment": (key.get("augment") or {}).get("kind", ""),
                "layers": json.dumps(list(layer_dims)), "layer_dims": json.dumps(layer_dims),
                "all_layers": json.dumps(list(all_layers)), "protocol": key["protocol"],
                "token_shape": json.dumps(list(token_shape or [])),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
            if extra is not None:
                extra(f)
            f.attrs["complete"] = True  # last, after everything else is in the file


@dataclass
class FeatureCache:
    """A validated cache file. `load(split)` reads (features, labels) into memory."""

    path: Path
    attrs: dict
    classes: list[str]
    feature_dim: int
    splits: list[str]

    @property
    def key(self) -> dict:
        """The cache's identity (probe.identity): everything its features depend on."""
        return json.loads(self.attrs["key"])

    @property
    def all_layers(self) -> list[str]:
        """Every block the model offers to --layers, in depth order (caches of probe 0.3 did not record it)."""
        return json.loads(self.attrs.get("all_layers", "[]"))

    @property
    def views(self) -> int:
        """How many augmented views of each training image the file holds (train/views [K, N, D])."""
        return int(self.attrs.get("views", 0))

    def load_views(self, count: int | None = None) -> np.ndarray:
        """The first `count` (default all) augmented views of the training images: [count, N, D]."""
        count = self.views if count is None else count
        if not 0 <= count <= self.views:
            raise ProbeError(f"--views {count}, but {self.path.name} holds {self.views} view(s) of each training image")
        try:
            with h5py.File(self.path, "r") as f:
                return f["train/views"][:count] if count else np.empty((0, 0, self.feature_dim), np.float32)
        except (OSError, KeyError) as e:
            raise ProbeError(f"cache {self.path} is corrupt ({e}); delete it and run probe extract again") from None

    @property
    def layers(self) -> list[str]:
        """The blocks whose pooled features the file holds (`probe extract --layers`), in depth order."""
        return json.loads(self.attrs.get("layers", "[]"))

    def layer_group(self, layer: str) -> list[str]:
        """The layers `--layer` names: one of them, or last4 (the last four, concatenated)."""
        if not self.layers:
            raise ProbeError(f"{self.path.name} holds no layers; extract them with probe extract --layers all ...")
        if layer == "last4":
            if len(self.layers) < 4:
                raise ProbeError(f"{self.path.name} holds {len(self.layers)} layer(s) ({', '.join(self.layers)}); last4 "
                                 "needs the last four blocks: probe extract --layers last4 (or all)")
            return self.layers[-4:]
        if layer not in self.layers:
            raise ProbeError(f"{self.path.name} holds no layer {layer!r}: choose last4 or one of {', '.join(self.layers)}")
        return [layer]

    @property
    def token_shape(self) -> tuple[int, int, int] | None:
        """(G, G, C) of the token maps the file holds (probe extract --tokens), or None."""
        return tuple(json.loads(self.attrs.get("token_shape", "[]"))) or None

    def columns(self, split: str, layer: str | None = None) -> list[str]:
        """The HDF5 datasets of a split's features, side by side: the final feature, a layer (group), or
        with layer "tokens" the token maps, one flattened [G * G * C] row per image."""
        if split not in self.splits:
            raise ProbeError(f"cache {self.path} has no {split} split (its data set had no {split}/ folder)")
        if layer == "tokens":
            if not self.token_shape:
                raise ProbeError(f"{self.path.name} holds no token maps: extract with probe extract --tokens ...")
            return [f"{split}/tokens"]
        return [f"{split}/layers/{n}" for n in self.layer_group(layer)] if layer else [f"{split}/features"]

    def labels(self, split: str) -> np.ndarray:
        """A split's labels alone (small: what a fit plans its rows from)."""
        if split not in self.splits:
            raise ProbeError(f"cache {self.path} has no {split} split (its data set had no {split}/ folder)")
        try:
            with h5py.File(self.path, "r") as f:
                return f[f"{split}/labels"][...]
        except OSError as e:
            raise ProbeError(f"cache {self.path} is corrupt ({e}); delete it and run probe extract again") from None

    def load(self, split: str, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of a split; layer: a layer's pooled features instead (or last4)."""
        if split not in self.splits:
            raise ProbeError(f"cache {self.path} has no {split} split (its data set had no {split}/ folder)")
        columns = self.columns(split, layer)
        try:
            with h5py.File(self.path, "r") as f:
                return np.concatenate([f[c][...] for c in columns], 1), f[f"{split}/labels"][...]
        except OSError as e:
            raise ProbeError(f"cache {self.path} is corrupt ({e}); delete it and run probe extract again") from None


def open_cache(path: str | os.PathLike, expect: dict | None = None) -> FeatureCache:
    """Open a cache file and check that it is complete and self-consistent before trusting it; with
    `expect` (a key), that it holds exactly those features: its stored key equal in every field."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"no cache file {path}")
    fix = "delete it and run probe extract again"
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if "probe_format" not in attrs:
                raise ProbeError(f"{path} is not a probe cache (an HDF5 file without probe's attributes); give a file "
                                 "that probe extract wrote")
            if attrs.get("probe_format") != FORMAT:
                raise ProbeError(f"{path} is not a probe cache of format {FORMAT}; {fix}")
            if not attrs.get("complete"):
                raise ProbeError(f"cache {path} is incomplete; {fix}")
            classes = json.loads(attrs["classes"])
            dim = int(attrs["feature_dim"])
            splits = [s for s in SPLITS if s in f]
            if "train" not in splits and "groups" not in attrs:  # only a shift set's cache is test-only
                raise ProbeError(f"cache {path} has no train split; {fix}")
            for s in splits:
                features, labels = f[f"{s}/features"], f[f"{s}/labels"]
                if features.ndim != 2 or features.shape[1] != dim or labels.shape != (features.shape[0],):
                    raise ProbeError(f"cache {path}: {s} features {features.shape} and labels {labels.shape} "
                                     f"do not fit width {dim}; {fix}")
            for s in splits:
                for name, width in json.loads(attrs.get("layer_dims", "{}")).items():
                    if f[f"{s}/layers/{name}"].shape != (f[f"{s}/labels"].shape[0], width):
                        raise ProbeError(f"cache {path}: {s}/layers/{name} is {f[f'{s}/layers/{name}'].shape}, not "
                                         f"{width} wide for every image; {fix}")
            shape = json.loads(attrs.get("token_shape", "[]"))
            for s in splits if shape else []:
                if f[f"{s}/tokens"].shape != (f[f"{s}/labels"].shape[0], int(np.prod(shape))):
                    raise ProbeError(f"cache {path}: {s}/tokens is {f[f'{s}/tokens'].shape}, not a {shape} token map "
                                     f"for every image; {fix}")
            views = int(attrs.get("views", 0))
            if views and f["train/views"].shape != (views, *f["train/features"].shape):
                raise ProbeError(f"cache {path}: train/views {f['train/views'].shape} does not hold {views} views "
                                 f"of {f['train/features'].shape}; {fix}")
    except ProbeError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ProbeError(f"cache {path} is unreadable or corrupt ({str(e).splitlines()[0]}); {fix}") from None
    cache = FeatureCache(path, attrs, classes, dim, splits)
    if expect is not None and not identity.same(cache.key, expect):
        fields = identity.differences([cache.key, expect])
        raise ProbeError(f"cache {path} holds other features than its name says (its key differs in "
                         f"{', '.join(fields)}); {fix}")
    return cache


def list_caches(cache_dir: str | os.PathLike = "cache") -> list[dict]:
    """One row per cache file or unfinished extraction under cache_dir, for `probe cache ls`."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise ProbeError(f"no cache folder {cache_dir}")
    rows = []
    for path in sorted(cache_dir.glob("*.h5")):
        row = {"file": path.name, "size_mb": path.stat().st_size / 2**20}
        try:
            cache = open_cache(path)
            with h5py.File(path, "r") as f:
                sizes = {s: int(f[f"{s}/labels"].shape[0]) for s in cache.splits}
            row.update(status="complete", model=cache.attrs["model"], dataset=cache.attrs["dataset"],
                       width=cache.feature_dim, dtype=cache.attrs["dtype"], splits=sizes)
        except ProbeError as e:
            row.update(status="corrupt", problem=str(e))
        rows.append(row)
    for parts in sorted(cache_dir.glob("*.h5.parts")):
        if not (parts / "key.json").is_file():  # not probe's shard folder: as cache rm sees it
            rows.append({"file": parts.name, "size_mb": 0.0, "status": "not probe's",
                         "problem": "a folder named like probe's shards, without their key.json"})
            continue
        partial = PartialCache(parts.with_name(parts.name[: -len(".parts")]), {})
        done = {s: partial.rows_done(s) for s in SPLITS}
        size = sum(f.stat().st_size for f in parts.iterdir()) / 2**20
        rows.append({"file": parts.name, "size_mb": size, "status": "incomplete (resumable)", "splits": done})
    # What a killed or failed run leaves: its HDF5 file half-assembled, or a lock with nothing beside it.
    for leftover in sorted([*cache_dir.glob("*.h5.tmp"), *cache_dir.glob("*.h5.lock")]):
        base = _base(leftover)
        if leftover.suffix == ".lock" and (base.exists() or base.with_name(base.name + ".parts").exists()):
            continue  # the lock of a cache file or of a resumable extraction
        rows.append({"file": leftover.name, "size_mb": leftover.stat().st_size / 2**20,
                     "status": "leftover", "problem": f"left by a run that stopped; probe cache rm {leftover}"})
    return rows


def _base(path: Path) -> Path:
    """The cache file that a shard folder, temporary file or lock file belongs to."""
    for suffix in (".parts", ".tmp", ".lock"):
        if path.name.endswith(".h5" + suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Read every attribute and dataset of a cache file; return the problems found (empty: sound)."""
    try:
        cache = open_cache(path)
    except ProbeError as e:
        return [str(e)]
    problems = []
    key = cache.key
    if key_hash(key) != cache.attrs.get("key_hash") or not Path(path).stem.endswith(key_hash(key)):
        problems.append(f"{path}: the key does not match its hash or the file name (renamed or edited?)")
    try:
        with h5py.File(path, "r") as f:
            for s in cache.splits:
                features, labels = f[f"{s}/features"][...], f[f"{s}/labels"][...]
                if not np.isfinite(features).all():
                    problems.append(f"{path}: {s} features hold NaN or infinite values")
                if cache.token_shape and not all(np.isfinite(f[f"{s}/tokens"][i:i + 256]).all()
                                                 for i in range(0, len(labels), 256)):
                    problems.append(f"{path}: {s} token maps hold NaN or infinite values")
                if f.attrs.get("task") == "segmentation":
                    masks = f[f"{s}/masks"][...] if f"{s}/masks" in f else None
                    if masks is None or (masks.size and (masks.min() < -1 or masks.max() >= len(cache.classes))):
                        problems.append(f"{path}: {s} masks missing or outside -1..{len(cache.classes) - 1}")
                    if s == "test" and not all(k in f for k in ("test/full_masks", "test/mask_shapes")):
                        problems.append(f"{path}: the test split's full-resolution masks are missing")
                if len(labels) and (labels.min() < 0 or labels.max() >= len(cache.classes)):
                    problems.append(f"{path}: {s} labels outside 0..{len(cache.classes) - 1}")
            for name in ("versions", "preprocessing"):
                json.loads(f.attrs[name])
    except (OSError, KeyError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}: {e}); delete it and run probe extract again")
    return problems


def remove_cache(path: str | os.PathLike) -> list[Path]:
    """Delete a cache file that probe wrote (or its unfinished shards) with its temporary file and lock;
    returns what was removed. A leftover temporary or lock file named alone is removed alone, never the
    cache beside it; a lock another process holds, and an .h5 file that is not a probe cache, are refused.
    """
    path = Path(path)
    if path.is_dir() and path.name == "text":  # the text embeddings (probe.zeroshot): recomputed when gone
        removed = sorted(path.glob("*.npz"))
        for f in removed:
            f.unlink()
        return removed
    if path.parent.name == "text" and path.suffix == ".npz":
        if not path.exists():
            raise ProbeError(f"{path} not found")
        path.unlink()
        return [path]
    base = _base(path)
    if base.suffix != ".h5":
        raise ProbeError(f"{path} is not a cache file (*.h5, or its .parts, .tmp or .lock)")
    if path.name.endswith(".h5.lock"):
        if path.exists() and _held(path):
            raise ProbeError(f"{path} is held by a running probe extract; nothing removed")
        targets = [path]
    elif path.name.endswith(".h5.tmp"):
        targets = [path]
    else:
        if base.is_file() and not _is_probe_cache(base):
            raise ProbeError(f"{base} is not a probe cache (no probe_format attribute, and not named as probe names "
                             "its caches); nothing removed")
        parts = base.with_name(base.name + ".parts")
        if parts.is_dir() and not (parts / "key.json").is_file():
            raise ProbeError(f"{parts} is not probe's shard folder (no key.json); nothing removed")
        targets = [base, parts, *(base.with_name(base.name + suffix) for suffix in (".tmp", ".lock"))]
    removed = []
    try:
        for p in targets:
            if p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
            elif p.exists():
                p.unlink()
                removed.append(p)
    except OSError as e:
        raise ProbeError(f"cannot remove {e.filename or path}: {e.strerror or e}") from None
    if not removed:
        raise ProbeError(f"no cache file {path}")
    return removed


def _is_probe_cache(path: Path) -> bool:
    """Whether probe wrote this file: an HDF5 file with probe's format attribute, or, for one too damaged to
    read, a name as probe gives its caches (ending in __<key hash>.h5)."""
    try:
        with h5py.File(path, "r") as f:
            return "probe_format" in f.attrs  # a readable HDF5 file is probe's only if it says so
    except OSError:
        return bool(re.search(r"__[0-9a-f]{10}\.h5$", path.name))


def _held(lock_file: Path) -> bool:
    """Whether another process holds this lock now."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(lock_file), timeout=0):
            return False
    except Timeout:
        return True
