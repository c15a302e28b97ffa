"""Extraction throughput per backbone, and the share of wall time spent outside the forward pass.

    python benchmarks/extract_throughput.py                      # CPU: the bundled sample at 224
    python benchmarks/extract_throughput.py --full --data DIR    # GPU: all 60,000 JPEG CIFAR-10 images

Throughput does not depend on the weights' values, so random init (--weights none) is used.
Target (issue 2): on a 2-core CPU, ResNet-18 at 224 spends at most 10% outside its forward pass; on
an H100, ResNet-18 at 224 over all 60,000 images at 20,000 images/s or more end to end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

from probe.data import SAMPLE_DIR  # noqa: E402
from probe.extract import extract  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,efficientnet_lite0")
    p.add_argument("--data", type=Path, default=SAMPLE_DIR, help="an image folder (train/ and test/)")
    p.add_argument("--per-class", type=int, default=None, help="images per class and split (default: all)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--full", action="store_true", help="GPU run: all images of --data, batch 512")
    p.add_argument("--out", default=None, help="result file (default: results/extract_throughput[_full].json)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.per_class is None else folder_subset(
            args.data, Path(tmp) / "data", {"train": args.per_class, "test": args.per_class})
        for model in args.models.split(","):
            t0 = time.perf_counter()
            r = extract(model=model, weights="none", dataset=f"folder:{data}", resolution=args.resolution,
                        cache_dir=str(Path(tmp) / "cache"), device=args.device, force=True,
                        batch_size=args.batch_size or (512 if args.full else None), progress=False)
            wall = time.perf_counter() - t0
            rows.append({"model": model, "resolution": args.resolution, "images": r.images,
                         "loop_seconds": r.seconds, "forward_seconds": r.forward_seconds, "wall_seconds": wall,
                         "images_per_second": r.images_per_second,
                         "images_per_second_wall": r.images / wall,
                         "share_outside_forward": 1 - r.forward_seconds / r.seconds})
            print(f"{model}: {r.images_per_second:.0f} images/s, "
                  f"{rows[-1]['share_outside_forward']:.1%} of the loop outside the forward pass")
    targets = {}
    r18 = next((r for r in rows if r["model"] == "resnet18" and r["resolution"] == 224), None)
    if r18 and not args.full:
        targets["resnet18_224_outside_forward_at_most_10pct"] = r18["share_outside_forward"] <= 0.10
    if r18 and args.full:
        targets["resnet18_224_at_least_20000_images_per_second"] = r18["images_per_second_wall"] >= 20000
    write_result("extract_throughput", {
        "settings": {"data": str(args.data), "per_class": args.per_class, "weights": "none",
                     "device": args.device, "batch_size": args.batch_size, "full": args.full},
        "notes": "loop_seconds: the backbone passes with decoding, resizing and the cache shards; "
                 "wall_seconds adds the model build, the file listing and the HDF5 assembly.",
        "rows": rows, "targets_met": targets,
    }, args.out or (Path(__file__).parent / "results" / f"extract_throughput{'_full' if args.full else ''}.json"))


if __name__ == "__main__":
    main()
