"""`probe extract`: run a frozen backbone once over a data set and keep its features in the cache."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import Timeout
from tqdm.auto import tqdm

from probe.backbones import (Preprocess, capture_tokens, create_backbone, inner, layer_names, pool_block, select_layers,
                             token_grid)
from probe.cache import PartialCache, open_cache
from probe.augment import augment
from probe.keys import identity_of, resolve_cache, resolve_precision  # noqa: F401  (identity_of: the stage's)
from probe import distributed
from probe.datasets.segmentation import check_masks, write_extras
from probe.device import device_type, format_bytes, is_out_of_memory, out_of_memory_error
from probe.errors import ProbeError
from probe.files import lock as file_lock
from probe.files import check_space, make_dir

if TYPE_CHECKING:  # torch is imported where the backbone runs: a cache hit never loads it
    import torch

log = logging.getLogger("probe")
# How much work a kill can lose at most (plus one batch); the environment variable is for tests.
SHARD_SECONDS = float(os.environ.get("PROBE_SHARD_SECONDS", 20.0))
SHARD_BYTES = 1 << 30  # and at most this much of token maps held before a shard is written


@dataclass
class ExtractResult:
    path: Path
    reused: bool  # True: the cache was already complete and no backbone pass ran
    images: int = 0  # images that went through the backbone in this run
    seconds: float = 0.0  # wall time of the backbone passes, data loading included
    forward_seconds: float = 0.0  # time inside the backbone's forward alone
    first_forward_seconds: float = 0.0  # of which the first batch's (with --compile: the compilation)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def extract(*, model: str = "resnet18", dataset: str = "cifar10", weights: str = "default",
            resolution: int | None = None, data_dir: str = "data", cache_dir: str = "cache",
            device: str = "auto", batch_size: int | None = None, dtype: str = "float32",
            num_workers: int | None = None, force: bool = False, views: int = 0, augment: str = "rrc",
            pool: str | None = None, layers: str | None = None, data_options: dict | None = None,
            precision: str = "auto", compile: bool = False, tokens: bool = False, token_grid: int | None = None,
            token_dtype: str = "float16", progress: bool = True) -> ExtractResult:
    """Run backbone `model` over both splits of `dataset` and write the features to the cache.

    model: a short name, timm:NAME, hf:REPO-OR-FOLDER or open_clip:ARCH/TAG; its own preprocessing
    is used (`resolution` overrides the size, keeping the crop fraction), and `pool` picks the
    feature of token models (None: the default of the model's family). layers: also store a pooled
    feature of these blocks from the same pass ("all", "last4" or "NAME,NAME"; `probe layers`).
    views: also store this many augmented views (`augment`: rrc, crop or flip) of every training
    image, in train/views; the test split is only ever the evaluation transform. A complete cache file
    with the same key is reused (no backbone pass) unless `force`. An interrupted run resumes from its
    last whole shard. data_options: image_column and label_column of an hf: data set. precision: the
    forward pass in fp32, or under bf16 or fp16 autocast (auto: fp16 on CUDA, fp32 on the CPU);
    compile: through torch.compile. Both are in the key. tokens: also store the final token map of every
    image of both splits ([N, G * G * C], token_dtype, one image a chunk; token_grid: average-pooled to
    G x G); the size is printed and checked against free disk before the pass. Returns where the file
    is and what it cost.
    """
    if batch_size is not None and batch_size < 1:
        raise ProbeError(f"batch size must be positive, not {batch_size}")
    w = distributed.world(device)  # under torchrun: this rank's place; else a world of one
    kind = device_type(device)  # torch is loaded only when the backbone runs: a cache hit does not
    data, key, path = resolve_cache(model=model, dataset=dataset, weights=weights, resolution=resolution,
                                    dtype=dtype, data_dir=data_dir, cache_dir=cache_dir, views=views, augment=augment,
                                    pool=pool, layers=layers, data_options=data_options, precision=precision,
                                    compile=compile, device=device, tokens=tokens, token_grid=token_grid,
                                    token_dtype=token_dtype)
    if dataset.startswith("captions:"):  # for image-text retrieval only: the text tower's space, whole images
        from probe.zeroshot import check_joint

        check_joint(key, "a caption set (it is for image-text retrieval)")
        if views:
            raise ProbeError("a caption set is for image-text retrieval: drop --views")
    if path.exists() and not force and not os.access(path.parent, os.W_OK):
        open_cache(path, expect=key)  # a complete cache on read-only storage: read it, no lock needed
        return ExtractResult(path, reused=True)
    make_dir(path.parent)
    # Rank 0 holds the lock for the whole job; the other ranks wait for its word at the broadcast.
    lock = file_lock(str(path) + ".lock")
    try:
        decision = None
        if w.main:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info(f"another probe extract is writing {path.name}; waiting for it to finish")
                lock.acquire()
            try:
                if path.exists() and not force:
                    open_cache(path, expect=key)  # a damaged or other file gets its error here, not a silent re-use
                    decision = "reuse"
                elif data.masks is not None:  # every mask read once: a bad one fails now, not after the pass
                    check_masks(data)
            except ProbeError as e:
                decision = e
        decision = distributed.broadcast(decision)
        if isinstance(decision, ProbeError):
            raise distributed.shared(decision)
        if decision == "reuse":
            return ExtractResult(path, reused=True)
        return _run(data, key, path, weights, kind, batch_size or (256 if kind == "cuda" else 64),
                    num_workers, resume=not force, progress=progress and w.main)
    except BaseException:
        # Bad input found before anything was written (weights that do not load, say): leave nothing,
        # not even the lock file.
        if w.main and not path.exists() and not path.with_name(path.name + ".parts").exists():
            Path(lock.lock_file).unlink(missing_ok=True)
        raise
    finally:
        if lock.is_locked:
            lock.release()


class Embedder:
    """A frozen backbone with its preprocessing: float images [N, 3, S, S] in 0..255 -> features [N, D].

    Extraction and `probe predict` both go through here, so they normalize the same way and run the
    same arithmetic: precision fp32, or bf16 / fp16 autocast on the model's device (the cache key
    records it, and a head passes its cache's on); compiled: the network through torch.compile.
    channels_last is used on the CPU as well, where it was faster too.

    layers ("all", "last4", or names): forward hooks also pool those blocks' outputs, on the device,
    in the same pass; the output is then [final | layer 1 | layer 2 | ...], `layer_dims` wide each.

    tokens (a grid side, 0 for the model's own): each pass also keeps the final token map, average-pooled
    to tokens x tokens where it is finer, in `last_tokens` as [N, G * G * C] (row-major grid, channels
    last: one image's tokens are one row); `token_shape` is (G, G, C).
    """

    def __init__(self, model: str, weights: str, pre: Preprocess, pool: str | None, device: torch.device,
                 layers: str | list[str] | None = None, precision: str = "fp32", compiled: bool = False,
                 tokens: int | None = None):
        import torch

        self.pre, self.device = pre, device
        self.precision = resolve_precision(precision, device)
        self.net = create_backbone(model, weights, pre, pool).to(device).to(memory_format=torch.channels_last)
        self.feature_dim = self.net.feature_dim
        self.tokens, self.token_shape, self.last_tokens = tokens, None, None
        if tokens is not None:
            if compiled:
                raise ProbeError("--tokens with --compile is not supported: drop --compile")
            capture_tokens(self.net, model)
            with torch.inference_mode():  # the grid and width from one small pass
                self.net(torch.zeros(1, 3, pre.size, pre.size, device=device).contiguous(memory_format=torch.channels_last))
            grid = token_grid(self.net.tokens, self.net.token_prefix)
            if grid.shape[-1] != grid.shape[-2]:
                raise ProbeError(f"--tokens: {model} at {pre.size} px gives a {grid.shape[-2]}x{grid.shape[-1]} token "
                                 "grid, not a square one")
            side = grid.shape[-1] if not tokens else tokens
            if side > grid.shape[-1]:
                raise ProbeError(f"--token-grid {tokens}: {model} at {pre.size} px gives a {grid.shape[-2]}x"
                                 f"{grid.shape[-1]} token grid; give at most {grid.shape[-1]}")
            self.token_shape = (side, side, grid.shape[1])
        self.layers, self.layer_dims, self._pooled = [], {}, {}
        self.all_layers = []
        if layers:
            self.all_layers = layer_names(self.net)
            self.layers = select_layers(self.net, layers, model)
            root = inner(self.net)
            token_pool = getattr(self.net, "pool", None)
            prefix = getattr(self.net, "prefix_tokens", 0)
            for name in self.layers:
                root.get_submodule(name).register_forward_hook(
                    lambda module, args, output, name=name: self._pooled.__setitem__(
                        name, pool_block(output, token_pool, prefix)))
            probe_image = torch.zeros(1, 3, pre.size, pre.size, device=device)
            with torch.inference_mode():  # widths from one small pass
                self.net(probe_image.contiguous(memory_format=torch.channels_last))
            self.layer_dims = {name: self._pooled[name].shape[1] for name in self.layers}
        self.forward, self.compiled, self.compiled_batch = self.net, compiled, 0
        if compiled:  # the first batch's size is the compiled one; shorter batches are padded to it
            self.forward = _compile(self.net)
        self.calls, self.first_forward_seconds = 0, 0.0
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
        self.forward_seconds = 0.0  # time spent in the backbone itself
        self.max_batch = 1 << 30  # lowered when a batch runs out of memory

    def in_pieces(self, images: torch.Tensor) -> torch.Tensor:
        """self(images), or, when the batch does not fit in memory, in halves (down to single images);
        later batches keep the size that fitted. The features do not depend on the batch size."""
        import torch

        piece = min(len(images), self.max_batch)
        try:
            if piece == len(images):  # the usual case: one pass, no concatenation
                return self(images)
            features, tokens = [], []
            for i in range(0, len(images), piece):
                features.append(self(images[i:i + piece]))
                tokens.append(self.last_tokens)
            if self.tokens is not None:
                self.last_tokens = torch.cat(tokens)
            return torch.cat(features)
        except Exception as e:
            if not is_out_of_memory(e) or piece == 1:
                raise
        self.max_batch = max(1, piece // 2)
        self.compiled_batch = 0  # compiled again for the smaller batch
        log.warning(f"out of memory with {piece} images per forward pass; retrying with {self.max_batch}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.in_pieces(images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self._forward(images)

    def _forward(self, images):
        import torch

        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        n = len(x)
        if self.compiled_batch and n < self.compiled_batch:  # a short last batch, padded: no recompilation
            x = torch.cat([x, x.new_zeros(self.compiled_batch - n, *x.shape[1:])]).contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=getattr(torch, AUTOCAST[self.precision]),
                            enabled=self.precision != "fp32"):
            features = self.forward(x).float()[:n]
        if self.layers:
            features = torch.cat([features, *(self._pooled.pop(name)[:n] for name in self.layers)], 1)
        if self.tokens is not None:
            grid = token_grid(self.net.tokens, self.net.token_prefix)[:n].float()
            if grid.shape[-1] != self.token_shape[0]:  # --token-grid: the mean of each cell's tokens
                grid = torch.nn.functional.adaptive_avg_pool2d(grid, self.token_shape[0])
            self.last_tokens = grid.permute(0, 2, 3, 1).reshape(n, -1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        if not self.calls:
            self.first_forward_seconds = seconds  # with --compile: the compilation
        self.calls += 1
        self.compiled_batch = self.compiled_batch or (len(x) if self.compiled else 0)
        self.forward_seconds += seconds
        return features


AUTOCAST = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtypes by name


def _compile(net):
    """torch.compile of a frozen network; a one-line error where the machine cannot compile."""
    import torch

    try:
        return torch.compile(net, dynamic=False)
    except Exception as e:  # no compiler, an unsupported platform
        raise ProbeError(f"--compile: torch.compile is not available here ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); run without --compile") from None


def _run(data, key, path, weights, kind, batch_size, num_workers, resume, progress) -> ExtractResult:
    """Every rank runs the backbone over its own rows of every pass (the split, then each augmented view
    of the training images) and writes shards; rank 0 then assembles the HDF5 file. With one process,
    its rows are all of them."""
    import torch

    from probe.batches import decode_small, iter_batches

    w = distributed.current()
    dev = torch.device("cuda", w.local_rank) if kind == "cuda" else torch.device("cpu")
    pre = Preprocess.from_dict(key["preprocessing"], key["resolution"])
    tokens = key.get("tokens")
    embed = Embedder(key["model"], weights, pre, key["pool"], dev, layers=key.get("layers"), precision=key["precision"],
                     compiled=key["compile"], tokens=tokens["grid"] if tokens else None)
    store = np.float16 if key["dtype"] == "float16" else np.float32
    if tokens and w.main:
        _check_token_space(path, embed.token_shape, np.dtype(tokens["dtype"]), sum(map(len, data.splits.values())))
    parts = PartialCache(path, key)
    if w.main:
        parts.start(resume=resume)
    distributed.barrier()  # the shard folder is ready (and emptied with --force) before anyone looks at it
    # One pass per split, then one per augmented view of the training images (views are seeded per
    # view and image, so a resumed pass repeats exactly what a straight one would have drawn).
    passes = [(name, split, None) for name, split in data.splits.items()]
    passes += [(name, data.splits["train"], _view_transform(pre, key["augment"]["kind"], v))
               for v, name in enumerate(parts.view_splits())]
    # This rank's rows of each pass, aligned to the batch size so that its batches are exactly the
    # batches of a single process (the features are then the same bit for bit), minus what shards of
    # any earlier run (of any world size) already cover.
    ranges = {name: distributed.rank_rows(len(split), w, batch_size) for name, split, _ in passes}
    work = {name: parts.gaps(name, *ranges[name]) for name, split, _ in passes}
    todo = distributed.all_gather(sum(b - a for gaps in work.values() for a, b in gaps))
    total = sum(len(split) for _, split, _ in passes)
    if sum(todo) < total and w.main:
        log.info(f"resuming {path.name}: {sum(todo)} images left")
    decoded = {}
    result = ExtractResult(path, reused=False)
    bar = tqdm(total=sum(todo), unit="img", desc=f"extract {key['model']}" + (f" ({w.size} ranks)" if w.size > 1 else ""),
               disable=not progress)
    t0, last_count = time.perf_counter(), time.perf_counter()
    error = None
    try:
        with bar:
            for name, split, transform in passes:
                if not work[name]:
                    continue
                # This rank's rows only, decoded once (the views reuse train's pixels); rows below are
                # the data set's, `lo` less in the subset.
                lo, hi = ranges[name]
                if (id(split), lo, hi) not in decoded:
                    decoded[id(split), lo, hi] = decode_small(split.subset(np.arange(lo, hi)) if (lo, hi) != (0, len(split))
                                                              else split)
                mine = decoded[id(split), lo, hi]
                shifted = None if transform is None else (lambda images, row, t=transform, lo=lo: t(images, row + lo))
                for gap_start, gap_stop in work[name]:
                    row = gap_start
                    pending, pending_tokens, shard_start, last_flush = [], [], row, time.perf_counter()
                    for images in iter_batches(mine, pre, batch_size, dev, start=row - lo, stop=gap_stop - lo,
                                               num_workers=num_workers, transform=shifted):
                        features = embed.in_pieces(images)
                        if transform is not None:  # augmented views keep the final feature only
                            features = features[:, :embed.feature_dim]
                        pending.append(features.cpu().numpy().astype(store, copy=False))
                        if tokens and transform is None:
                            pending_tokens.append(_stored_tokens(embed.last_tokens, tokens["dtype"]))
                        row += len(images)
                        result.images += len(images)
                        if time.perf_counter() - last_flush > SHARD_SECONDS or row == gap_stop or \
                                sum(t.nbytes for t in pending_tokens) > SHARD_BYTES:
                            parts.write(name, shard_start, np.concatenate(pending),
                                        np.concatenate(pending_tokens) if pending_tokens else None)
                            pending, pending_tokens, shard_start, last_flush = [], [], row, time.perf_counter()
                        bar.update(len(images))
                        if w.size > 1 and time.perf_counter() - last_count > 2:
                            last_count = time.perf_counter()
                            if failed := parts.failure():  # another rank failed: stop too
                                raise _OtherRankFailed(failed)
                            if w.main:  # the bar counts every rank's images, from the shards they have written
                                done = sum(parts.rows_covered(n, len(s)) for n, s, _ in passes) - (total - sum(todo))
                                bar.update(max(0, done - bar.n))
    except Exception as e:
        error = e
        if is_out_of_memory(e):  # finished shards are kept: the same command with smaller settings resumes
            error = out_of_memory_error(e, f"extracting {key['model']} at resolution {pre.size} in batches of "
                                           f"{batch_size}", "lower --batch-size or --resolution")
            if w.size == 1:
                raise error from None
        if w.size == 1:
            raise
        if not isinstance(error, _OtherRankFailed):  # tell the others, which stop at their next check
            parts.fail(w.rank, _first_line(error))
    if w.size > 1:  # every rank learns whether any failed; all end with the failing rank's own message
        own = None if error is None or isinstance(error, _OtherRankFailed) else _first_line(error)
        failures = [f for f in distributed.all_gather(own) if f]
        if error is not None and not isinstance(error, ProbeError):
            raise error  # not bad input but a fault of probe's: its traceback, on its rank
        if failures or error is not None:
            raise distributed.shared(ProbeError(failures[0] if failures else str(error)))
    result.seconds = time.perf_counter() - t0
    result.forward_seconds, result.first_forward_seconds = embed.forward_seconds, embed.first_forward_seconds
    published = None
    if w.main:
        try:
            parts.finish(classes=data.classes, labels={s: sp.labels for s, sp in data.splits.items()},
                         feature_dim=embed.feature_dim, versions=_versions(),
                         layer_dims=embed.layer_dims, all_layers=embed.all_layers, token_shape=embed.token_shape,
                         extra=partial(write_extras, data, embed.token_shape),
                         weights_path="" if weights in ("default", "none") else str(Path(weights).resolve()))
        except ProbeError as e:
            published = e
    published = distributed.broadcast(published)  # the other ranks wait here while rank 0 assembles
    if published is not None:
        raise distributed.shared(published)
    if w.size > 1:  # the job's images per second: every rank's images over the slowest rank's time
        counts = distributed.all_gather((result.images, result.seconds))
        result.images, result.seconds = sum(c for c, _ in counts), max(t for _, t in counts)
    return result


def _stored_tokens(tokens: torch.Tensor, dtype: str) -> np.ndarray:
    """A batch's token maps in their storage dtype; values float16 cannot hold are refused, not stored as inf."""
    with np.errstate(over="ignore"):  # an overflow is refused below, in one line, not warned about
        stored = tokens.cpu().numpy().astype(dtype)
    if not np.isfinite(stored).all():
        what = "beyond float16's range (65504)" if np.isfinite(tokens.cpu().numpy()).all() else "not finite"
        raise ProbeError(f"token values {what} in this batch; extract with --token-dtype float32"
                         if dtype == "float16" else f"token values {what}: the backbone's output is not usable")
    return stored


def _check_token_space(path: Path, shape: tuple[int, int, int], dtype: np.dtype, images: int) -> None:
    """Say what the token maps will take, and refuse before the pass if the disk cannot hold them (the
    shards and, while the file is assembled, the file beside them: about twice the cache)."""
    per_image = int(np.prod(shape)) * dtype.itemsize
    log.info(f"token maps: {shape[0]}x{shape[1]}x{shape[2]} {dtype.name} per image, {format_bytes(per_image)} each, "
             f"{format_bytes(per_image * images)} for {images} images")
    check_space(path.parent, 2 * per_image * images, f"--tokens ({format_bytes(per_image * images)} of token maps, "
                "twice that while the file is assembled); give --token-grid G or --cache-dir on a larger disk")


class _OtherRankFailed(ProbeError):
    """Another rank of a torchrun extraction failed (its message, from its marker in the shard folder)."""


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


VIEW_SEED = 1_000_003


def view_generator(view: int, row: int) -> torch.Generator:
    """The generator image `row` of view `view` draws its crop from: a function of (view, row) alone, so a
    view is the same whatever the batch, the rank or a resume (SeedSequence mixes the three numbers;
    torch's generator keeps only 32 bits of a seed)."""
    import torch

    seed = int(np.random.SeedSequence((VIEW_SEED, view, row)).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def _view_transform(pre: Preprocess, kind: str, view: int):
    """The augmentation of view `view` for a batch whose first image is row `row`."""
    from probe.batches import center_square

    # Square first (small images arrive at their own size), so a view crops the frame the plain features show.
    return lambda images, row: augment(center_square(images), pre, kind,
                                       [view_generator(view, row + i) for i in range(len(images))])


def _versions() -> dict:
    versions = {}
    for package in ("probe", "torch", "torchvision", "timm", "transformers", "open_clip_torch", "h5py", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
