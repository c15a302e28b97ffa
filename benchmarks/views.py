"""Augmentation without per-epoch backbone passes: the cached logreg on 0, 1, 4 and 10 stored views
of each training image against finetune-linear trained with the same augmentation, same images, one run.

    python benchmarks/views.py --data /tmp/cifar10-jpeg        # CPU: lite0 at 96 px, 300 per class

Each cached run's wall time is its whole first experiment: `probe extract --views K` (the plain
features, K views of the training images and the test split) plus `probe fit`. finetune-linear runs
with probe finetune's defaults (evaluation on the test split after every epoch, which its learning
curve needs). Backbone passes of each are counted too: per image, a view costs what an epoch does.
Target (issue 11): 10 views close at least half of the accuracy gap between the plain cached probe
and finetune-linear with augmentation, at under a third of finetune-linear's wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, small_data_arguments, write_result  # noqa: E402

from probe.extract import extract  # noqa: E402
from probe.finetune import finetune  # noqa: E402
from probe.fit import fit  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small_data_arguments(p)
    p.add_argument("--views", default="0,1,4,10")
    p.add_argument("--augment", default="rrc")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = folder_subset(args.data, tmp / "data", {"train": args.train_per_class, "test": args.test_per_class})
        common = dict(model=args.model, weights=args.weights, resolution=args.resolution, dataset=f"folder:{data}",
                      device=args.device)
        for k in map(int, args.views.split(",")):
            t0 = time.perf_counter()
            cache = extract(**common, views=k, augment=args.augment, cache_dir=str(tmp / f"cache{k}"), progress=False)
            m = fit(head="logreg", features=str(cache.path), out=str(tmp / f"logreg{k}"), device=args.device).metrics
            rows.append({"method": f"cached logreg, {k} views", "views": k, "test_accuracy": m["test_accuracy"],
                         "wall_seconds": time.perf_counter() - t0, "backbone_passes": cache.images,
                         "C_chosen": m["hyperparameters"]["C_chosen"]})
            print(f"{rows[-1]['method']}: {m['test_accuracy']:.4f} in {rows[-1]['wall_seconds']:.0f} s", flush=True)
        t0 = time.perf_counter()
        m = finetune(strategy="linear", **common, epochs=args.epochs, augmentation=args.augment,
                     out=str(tmp / "finetune"), progress=False).metrics
        n_train, n_test = m["n_train"], m["n_test"]
        rows.append({"method": f"finetune-linear, {args.augment}", "views": None, "test_accuracy": m["test_accuracy"],
                     "wall_seconds": time.perf_counter() - t0, "backbone_passes": args.epochs * (n_train + n_test)})
        print(f"{rows[-1]['method']}: {m['test_accuracy']:.4f} in {rows[-1]['wall_seconds']:.0f} s", flush=True)
    plain = next(r for r in rows if r["views"] == 0)
    most = max((r for r in rows if r["views"]), key=lambda r: r["views"])
    tuned = rows[-1]
    gap = tuned["test_accuracy"] - plain["test_accuracy"]
    closed = (most["test_accuracy"] - plain["test_accuracy"]) / gap if gap > 0 else None
    write_result("views", {
        "settings": {"data": str(args.data), "model": args.model, "weights": args.weights,
                     "resolution": args.resolution, "train_per_class": args.train_per_class, "n_train": n_train,
                     "n_test": n_test, "augment": args.augment, "epochs": args.epochs, "device": args.device},
        "rows": rows, "gap_closed_by_most_views": closed,
        "wall_share_of_finetune_linear": most["wall_seconds"] / tuned["wall_seconds"],
        "notes": "gap: finetune-linear's accuracy minus the plain cached probe's; closed: the share of it the "
                 "most views recover (None when finetune-linear is not above the plain probe).",
        "targets_met": {
            f"{most['views']}_views_close_half_the_gap": None if closed is None else closed >= 0.5,
            f"{most['views']}_views_under_a_third_of_finetune_linear_wall_time":
                most["wall_seconds"] < tuned["wall_seconds"] / 3,
        },
    }, args.out)


if __name__ == "__main__":
    main()
