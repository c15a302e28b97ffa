"""What a folder's content fingerprint costs, against the extraction it guards.

    python benchmarks/fingerprint.py --data /tmp/cifar10-jpeg

A folder cache's key holds a hash of every image file's bytes (not only names and sizes), so an
image replaced by another of the same size is never a stale cache hit. This reads every file once per
extract and per fit. Measured in one run: the listing with names and sizes only (the old fingerprint),
the content fingerprint, and lite0's extraction rate at 224 on a subset of the same folder, from which
the whole folder's extraction time is projected.
Target (issue 17): the content fingerprint under 10% of the extraction's wall time on this CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

from probe.datasets import IMAGE_EXTENSIONS, load_dataset  # noqa: E402
from probe.extract import extract  # noqa: E402


def names_and_sizes(root: Path) -> int:
    """The old fingerprint's work: list every file and stat it."""
    return sum(f.stat().st_size > 0 for f in root.glob("*/*/*") if f.suffix.lower() in IMAGE_EXTENSIONS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder (train/ and test/)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rate-per-class", type=int, default=50, help="images per class and split for the rate")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    t = time.perf_counter()
    files = names_and_sizes(args.data)
    listing = time.perf_counter() - t
    content = []
    for _ in range(2):  # the first read may come from disk, the second from the page cache
        t = time.perf_counter()
        data = load_dataset(f"folder:{args.data.resolve()}")
        content.append(time.perf_counter() - t)
    n_images = sum(len(s) for s in data.splits.values())
    with tempfile.TemporaryDirectory() as tmp:
        subset = folder_subset(args.data, Path(tmp) / "d", {"train": args.rate_per_class, "test": args.rate_per_class})
        r = extract(model=args.model, weights="none", dataset=f"folder:{subset}", resolution=args.resolution,
                    cache_dir=str(Path(tmp) / "cache"), progress=False)
    projected = n_images / r.images_per_second
    share = max(content) / projected
    print(f"{n_images} images: names+sizes {listing:.1f} s, content fingerprint {content[0]:.1f} s / {content[1]:.1f} s; "
          f"extraction at {r.images_per_second:.1f} images/s -> {projected / 60:.0f} min; share {share:.2%}")
    write_result("fingerprint", {
        "settings": {"data": str(args.data), "model": args.model, "resolution": args.resolution,
                     "rate_images": r.images},
        "images": n_images, "files_listed": files, "names_and_sizes_seconds": listing,
        "content_fingerprint_seconds": content, "extract_images_per_second": r.images_per_second,
        "projected_extract_seconds": projected, "fingerprint_share_of_extract": share,
        "notes": "projected_extract_seconds = images / the rate measured on the subset in the same run; "
                 "the share uses the slower of the two fingerprint runs.",
        "targets_met": {"content_fingerprint_under_10pct_of_extraction": share < 0.10},
    }, args.out)


if __name__ == "__main__":
    main()
