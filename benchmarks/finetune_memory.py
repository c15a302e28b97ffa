"""Peak resident memory of `probe finetune` against the number of training images: it reads images a batch
at a time, so 50,000 training images must cost what 5,000 do.

    python benchmarks/finetune_memory.py --data /tmp/cifar10-jpeg

Each run is its own process (`probe finetune --strategy linear --epochs 1` on the JPEG CIFAR-10, 500 per
class, then all 5,000 per class; the same 10,000 test images), its peak RSS from the kernel's rusage of
that process (os.wait4). Target (issue 26): the two peaks within 10%.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402


def peak_rss(command: list[str]) -> tuple[int, float, int]:
    """(peak resident bytes, seconds, exit code) of a command run as its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, os.waitstatus_to_exitcode(status)  # ru_maxrss: KiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder, e.g. the JPEG CIFAR-10")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--weights", default="default")
    p.add_argument("--sizes", default="500,5000", help="training images per class of each run")
    p.add_argument("--test-per-class", type=int, default=None, help="default: the full test split")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for per_class in map(int, args.sizes.split(",")):
            data = folder_subset(args.data, tmp / f"data{per_class}", {"train": per_class, "test": args.test_per_class})
            command = [sys.executable, "-m", "probe", "-q", "finetune", "--strategy", "linear", "--epochs", "1",
                       "--model", args.model, "--weights", args.weights, "--resolution", str(args.resolution),
                       "--dataset", f"folder:{data}",
                       "--out", str(tmp / f"run{per_class}")]
            rss, seconds, code = peak_rss(command)
            if code:
                raise SystemExit(f"{' '.join(command)} failed ({code})")
            n = sum(1 for _ in (data / "train").glob("*/*"))
            rows.append({"train_images": n, "peak_rss_bytes": rss, "seconds": seconds})
            print(f"{n} training images: peak RSS {rss / 2**20:.0f} MiB in {seconds:.0f} s", flush=True)
    ratio = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    write_result("finetune_memory", {
        "settings": {"data": str(args.data), "model": args.model, "weights": args.weights, "resolution": args.resolution,
                     "strategy": "linear", "epochs": 1, "test_per_class": args.test_per_class},
        "rows": rows, "peak_ratio_largest_over_smallest": ratio,
        "notes": "peak RSS of the whole probe finetune process (os.wait4's ru_maxrss), model and libraries included",
        "targets_met": {"peak_rss_within_10_percent": abs(ratio - 1) <= 0.10},
    }, args.out)


if __name__ == "__main__":
    main()
