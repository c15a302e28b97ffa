"""Issue 11's open target, searched honestly: the learning rates of full fine-tuning and lp-ft picked
on a validation split held out of the training images, at the strategies benchmark's own size.

    python benchmarks/lr_search.py --data /tmp/cifar10-jpeg       # CPU: lite0 at 96 px, about an hour

Training: the first 300 training images per class (those strategies.py trains on). Validation: the
next 100 training images per class, never the test split. 10 epochs each, as strategies.py. full
trains the backbone at each --lr with the head at 10x; lp-ft starts from the cached logreg head fitted
on the same 3,000 images and trains everything at each --lr. The pick per strategy is the rate with
the best final validation accuracy; strategies.py is then run with those rates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

from probe.extract import extract  # noqa: E402
from probe.finetune import finetune  # noqa: E402
from probe.fit import fit  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder, e.g. the JPEG CIFAR-10")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="default")
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--validation-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--full-lrs", default="1e-4,3e-4", help="backbone rates of full (head at 10x)")
    p.add_argument("--lp-ft-lrs", default="3e-5,1e-4,3e-4", help="rates of lp-ft (every layer)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    n, v = args.train_per_class, args.validation_per_class
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = folder_subset(args.data, tmp / "data", {"train": n, "test": ("train", n, n + v)})
        common = dict(model=args.model, weights=args.weights, resolution=args.resolution, dataset=f"folder:{data}",
                      device=args.device)
        cache = extract(**common, cache_dir=str(tmp / "cache"), progress=False)
        m = fit(head="logreg", features=str(cache.path), out=str(tmp / "logreg"), device=args.device).metrics
        rows.append({"run": "cached logreg", "lr": None, "validation_accuracy": m["test_accuracy"], "curve": None})
        print(f"cached logreg: {m['test_accuracy']:.4f}", flush=True)
        grid = [("full", float(lr), {"head_lr": 10 * float(lr)}) for lr in args.full_lrs.split(",")]
        grid += [("lp-ft", float(lr), {"init_head": str(tmp / "logreg")}) for lr in args.lp_ft_lrs.split(",")]
        for strategy, lr, extra in grid:
            m = finetune(strategy=strategy, **common, epochs=args.epochs, lr=lr, out=str(tmp / f"{strategy}-{lr:g}"),
                         progress=False, **extra).metrics
            rows.append({"run": strategy, "lr": lr, "head_lr": extra.get("head_lr"), "validation_accuracy": m["test_accuracy"],
                         "curve": [h["test_accuracy"] for h in m["history"]],
                         "train_accuracy": [h["train_accuracy"] for h in m["history"]], "wall_seconds": m["wall_seconds"]})
            print(f"{strategy} lr={lr:g}: {m['test_accuracy']:.4f} " + " ".join(f"{a:.3f}" for a in rows[-1]["curve"]),
                  flush=True)
        n_train, n_val = m["n_train"], m["n_test"]
    picks = {}
    for strategy in ("full", "lp-ft"):
        best = max((r for r in rows if r["run"] == strategy), key=lambda r: r["validation_accuracy"])
        picks[strategy] = best["lr"]
    write_result("lr_search", {
        "settings": {"data": str(args.data), "model": args.model, "resolution": args.resolution,
                     "n_train": n_train, "n_validation": n_val, "epochs": args.epochs,
                     "train": f"the first {n} training images per class",
                     "validation": f"training images {n}..{n + v - 1} of each class (never the test split)"},
        "rows": rows, "picked_lr": picks,
    }, args.out)


if __name__ == "__main__":
    main()
