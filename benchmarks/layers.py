"""Every layer in one pass: what `probe extract --layers all` costs against the final-only pass, and
where in EfficientNet-Lite0 CIFAR-10 becomes linearly separable, pretrained against random init.

    python benchmarks/layers.py --data /tmp/cifar10-jpeg      # CPU: a few hundred images per class

The two extractions of the cost comparison run alternately in one run (best of --repeats, each a
fresh cache), on the same images, model and resolution. Then `probe depth` fits logreg (with its C
sweep) on every layer of the pretrained and the random-init cache and draws both curves.
Target (issue 13): the multi-layer pass at most 1.3x the final-only pass.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

from probe.depth import depth  # noqa: E402
from probe.device import tune_cpu_allocator  # noqa: E402
from probe.extract import extract  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder with train/ and test/ (the JPEG CIFAR-10)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    tune_cpu_allocator()  # as the probe command does
    with tempfile.TemporaryDirectory() as tmp:
        data = folder_subset(args.data, Path(tmp) / "cifar10-jpeg-subset",
                             {"train": args.train_per_class, "test": args.test_per_class})
        common = {"model": args.model, "dataset": f"folder:{data}", "resolution": args.resolution,
                  "device": args.device, "progress": False}
        extract(**common, weights="none", cache_dir=str(Path(tmp) / "warm"))  # fingerprint, imports, first-run costs
        seconds = {"final only": [], "--layers all": []}
        for _ in range(args.repeats):
            for label, layers in (("final only", None), ("--layers all", "all")):
                cache_dir = Path(tmp) / "timing"
                shutil.rmtree(cache_dir, ignore_errors=True)
                t = time.perf_counter()
                extract(**common, cache_dir=str(cache_dir), layers=layers)
                seconds[label].append(time.perf_counter() - t)
        ratio = min(seconds["--layers all"]) / min(seconds["final only"])
        print(f"--layers all: {ratio:.2f}x the final-only extraction ({min(seconds['--layers all']):.1f} s against "
              f"{min(seconds['final only']):.1f} s)")
        caches = [extract(**common, cache_dir=str(Path(tmp) / "cache"), weights=w, layers="all").path
                  for w in ("default", "none")]
        curves = depth([str(c) for c in caches], out=str(Path(tmp) / "depth"), runs_dir=str(Path(tmp) / "runs"),
                       device=args.device)
        shutil.copy(Path(tmp) / "depth" / "depth.png", RESULTS / "layers_depth.png")
    for c in curves["curves"]:
        c["cache"] = Path(c["cache"]).name
        for point in c["points"]:
            point.pop("run")
    pretrained = [p["test_accuracy"] for p in curves["curves"][0]["points"] if p["layer"] != "final"]
    write_result("layers", {
        "settings": {"model": args.model, "resolution": args.resolution, "data": str(args.data),
                     "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
                     "repeats": args.repeats},
        "extract_seconds": seconds, "layers_all_over_final_only": ratio,
        "curves": curves["curves"],
        "pretrained_rises_with_depth": all(b >= a - 0.02 for a, b in zip(pretrained, pretrained[1:])),
        "notes": "extract_seconds: wall time of one extraction (data listing and fingerprint, model build, the "
                 "backbone pass, the HDF5 assembly) into a fresh cache, alternating; the ratio is best against best. "
                 "pretrained_rises_with_depth: no block more than 2 points below the one before it.",
        "targets_met": {"layers_all_at_most_1.3x_final_only": ratio <= 1.3},
    })


if __name__ == "__main__":
    main()
