"""Scale, simulated where this machine cannot reach: heads on ImageNet-sized features under a memory cap,
and extraction on 1 against 2 ranks.

    python benchmarks/scale.py --data /tmp/cifar10-jpeg             # CPU: about 40 min
    python benchmarks/scale.py --data DIR --skip-heads --ranks 1,2,4,8 --device cuda   # GPUs, when lent

1. Heads beyond memory: synthetic features the size of ImageNet-1k's training set (1,281,167 x 768,
   float16, 1.8 GiB on disk, Gaussian classes) written through probe's own cache writer (its assembly
   from shards into the one HDF5 file is timed: the copy a virtual data set would save); `probe fit
   --head logreg --max-memory 4GB` (the C sweep included) in a fresh process, with its wall time and
   peak RSS; then the in-memory fit (no cap) on a class-balanced subset that fits, in the same way.
   Targets (issue 14): peak RSS under the cap; the capped fit's time per training row within 1.5x of
   the in-memory fit's.
2. Extraction scaling: `torchrun --nproc-per-node N -m probe extract` of a ResNet-18 (random init: the
   rate does not depend on the weights) over a subset of the JPEG CIFAR-10, one thread per rank (as
   torchrun sets it), N = 1 and 2. Target: 2 ranks at least 1.7x the images/s of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

from probe.cache import PartialCache, cache_key, cache_path  # noqa: E402


SEPARATION = 0.12  # class means N(0, 0.06^2) per dimension against unit noise: neither trivial nor chance


def synthetic_cache(folder: Path, n_train: int, n_test: int, dim: int, classes: int,
                    seed: int = 0) -> tuple[Path, float, float]:
    """An ImageNet-sized float16 cache of Gaussian classes, written shard by shard like an extraction; the
    seconds its assembly (shards into the one HDF5 file, as rank 0 does it) took, and a plain copy of
    the shards."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    key = cache_key(dataset="synthetic", fingerprint=f"{n_train}x{dim}x{classes}-{seed}", protocol="synthetic",
                    model="synthetic", family="synthetic", weights="none", resolution=0, preprocessing={}, pool="",
                    dtype="float16")
    path = cache_path(folder, key)
    parts = PartialCache(path, key)
    parts.start(resume=False)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        for a in range(0, n, 100_000):  # a shard at a time: never the whole matrix in memory
            b = min(a + 100_000, n)
            X = means[y[a:b]] * SEPARATION + rng.standard_normal((b - a, dim), dtype=np.float32)
            parts.write(split, a, X.astype(np.float16))
        labels[split] = y
    t0 = time.perf_counter()
    shutil.copytree(parts.dir, folder / "copy")  # a plain copy of the same bytes, for the ratio
    os.sync()
    copy = time.perf_counter() - t0
    shutil.rmtree(folder / "copy")
    t0 = time.perf_counter()
    parts.finish(classes=[f"class{c}" for c in range(classes)], labels=labels, feature_dim=dim, versions={})
    os.sync()
    return path, time.perf_counter() - t0, copy


# The probe command, in a process that says its own peak resident memory when it ends.
# A --max-memory of "+4MB" is read as 4 MB over what the process holds once probe is imported (the smoke test's
# cap: a fixed figure would have to guess the size of torch and scikit-learn in memory).
WITH_PEAK = """import resource, sys
from probe.cli import main
import probe.fit  # what fit imports, so that the "+4MB" figure counts it
from probe.device import resident_bytes
from probe.rows import parse_bytes
argv = sys.argv[1:]
if "--max-memory" in argv and argv[argv.index("--max-memory") + 1].startswith("+"):
    i = argv.index("--max-memory") + 1
    argv[i] = str(resident_bytes() + parse_bytes(argv[i][1:]))
try:
    main(argv)
except SystemExit as e:
    code = e.code
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
sys.exit(code)
"""


def timed_fit(cache: Path, out: Path, *options: str) -> dict:
    """`probe fit` in a fresh process: its metrics, wall time and peak RSS."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WITH_PEAK, "-q", "fit", "--features", str(cache), "--head", "logreg",
                           "--out", str(out), *options], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    peak = int(re.search(r"PEAK (\d+)", done.stderr)[1])
    return {"options": list(options), "rows": metrics["n_train_rows"], "wall_seconds": wall,
            "fit_seconds": metrics["fit_seconds"], "peak_rss_bytes": peak, "streamed": metrics["streamed"],
            "C_chosen": metrics["hyperparameters"]["C_chosen"], "sweep_points": len(metrics["hyperparameters"]["sweep"]),
            "final_iterations": metrics["hyperparameters"].get("n_iter"), "test_accuracy": metrics["test_accuracy"]}


def extraction_rate(data: Path, cache: Path, ranks: int, device: str, resolution: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           "-m", "probe", "extract", "--dataset", f"folder:{data}", "--model", "resnet18", "--weights",
                           "none", "--resolution", str(resolution), "--device", device, "--cache-dir", str(cache)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    m = re.search(r"(\d+) images in ([\d.]+) s", done.stdout)
    return {"ranks": ranks, "images": int(m[1]), "seconds": float(m[2]), "images_per_second": int(m[1]) / float(m[2])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder, e.g. the JPEG CIFAR-10")
    p.add_argument("--rows", type=int, default=1_281_167)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--max-memory", default="4GB", help='the cap of the streamed fit; "+4MB": 4 MB over what probe holds')
    p.add_argument("--subset-per-class", type=int, default=1000, help="the in-memory fit's rows per class")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--images-per-class", type=int, default=400, help="per class and split, for the extraction")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-heads", action="store_true")
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"settings": vars(args) | {"data": str(args.data)}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_heads:
            t0 = time.perf_counter()
            cache, assembly, copy = synthetic_cache(tmp / "cache", args.rows, 50_000, args.dim, args.classes)
            print(f"synthetic cache {cache.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s, "
                  f"assembled in {assembly:.1f} s", flush=True)
            capped = timed_fit(cache, tmp / "capped", "--max-memory", args.max_memory)
            print(f"capped: {capped}", flush=True)
            subset = timed_fit(cache, tmp / "subset", "--train-per-class", str(args.subset_per_class))
            print(f"in memory, subset: {subset}", flush=True)
            per_row = (capped["fit_seconds"] / capped["rows"]) / (subset["fit_seconds"] / subset["rows"])
            from probe.rows import parse_bytes

            result["assembly"] = {"bytes": cache.stat().st_size, "seconds": assembly, "copy_seconds": copy,
                                  "over_a_plain_copy": assembly / copy}
            result["heads"] = {"capped": capped, "in_memory_subset": subset, "cache_bytes": cache.stat().st_size,
                               "time_per_row_capped_over_in_memory": per_row,
                               "cap_bytes": parse_bytes(args.max_memory)}
        if not args.skip_extraction:
            data = folder_subset(args.data, tmp / "images", {"train": args.images_per_class, "test": args.images_per_class})
            rates = [extraction_rate(data, tmp / f"extract{n}", int(n), args.device, args.resolution)
                     for n in args.ranks.split(",")]
            for r in rates:
                print(f"extraction, {r['ranks']} rank(s): {r['images_per_second']:.0f} images/s", flush=True)
            result["extraction"] = {"rates": rates, "speedup": {str(r["ranks"]): r["images_per_second"] /
                                                                rates[0]["images_per_second"] for r in rates}}
    targets = {}
    if "heads" in result:
        h = result["heads"]
        targets["capped fit peak RSS under the cap"] = h["capped"]["peak_rss_bytes"] < h["cap_bytes"]
        targets["capped fit time per row within 1.5x of in-memory"] = h["time_per_row_capped_over_in_memory"] <= 1.5
    if "2" in result.get("extraction", {}).get("speedup", {}):
        targets["2 ranks at least 1.7x 1 rank"] = result["extraction"]["speedup"]["2"] >= 1.7
    result["targets_met"] = targets
    write_result("scale", result, args.out)


if __name__ == "__main__":
    main()
