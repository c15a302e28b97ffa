"""Why fine-tuning fell below the frozen probe: BatchNorm trained against frozen, on a validation split
held out of the training images (never the test split), as issue 11 asks settings to be chosen.

    python benchmarks/bn_cause.py --data /tmp/cifar10-jpeg       # CPU: lite0 at 96 px, about 6 min

150 training images per class, 30% of them held out (stratified, seeded) as the validation split,
6 epochs: full and lp-ft (3 head epochs, then 3 of everything) with --bn train and --bn frozen, and
lp-ft started from the cached logreg head (every epoch fine-tuning), beside that logreg probe.
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
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--validation-fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = folder_subset(args.data, tmp / "data", {"train": args.train_per_class})  # train/ only
        common = dict(model=args.model, weights=args.weights, resolution=args.resolution, dataset=f"folder:{data}", device=args.device,
                      test_fraction=args.validation_fraction)
        cache = extract(**{k: v for k, v in common.items() if k != "test_fraction"}, cache_dir=str(tmp / "cache"),
                        progress=False)
        m = fit(head="logreg", features=str(cache.path), out=str(tmp / "logreg"),
                **{k: v for k, v in common.items() if k in ("device", "test_fraction")}).metrics
        rows.append({"run": "cached logreg", "bn": None, "validation_accuracy": m["test_accuracy"], "curve": None})
        print(f"cached logreg: {m['test_accuracy']:.4f}", flush=True)
        runs = [("full", bn, {}) for bn in ("train", "frozen")] + [("lp-ft", bn, {}) for bn in ("train", "frozen")]
        runs.append(("lp-ft", "frozen", {"init_head": str(tmp / "logreg")}))
        for strategy, bn, extra in runs:
            m = finetune(strategy=strategy, **common, epochs=args.epochs, bn=bn, out=str(tmp / f"{strategy}-{bn}-{len(rows)}"),
                         progress=False, **extra).metrics
            name = f"{strategy} from the cached logreg head" if extra else strategy
            rows.append({"run": name, "bn": bn, "lp_epochs": m["lp_epochs"], "validation_accuracy": m["test_accuracy"],
                         "curve": [h["test_accuracy"] for h in m["history"]]})
            print(f"{name} bn={bn}: {m['test_accuracy']:.4f} " + " ".join(f"{a:.3f}" for a in rows[-1]["curve"]), flush=True)
        n_train, n_val = m["n_train"], m["n_test"]
    write_result("bn_cause", {
        "settings": {"data": str(args.data), "model": args.model, "weights": args.weights, "resolution": args.resolution,
                     "train_per_class": args.train_per_class, "n_train": n_train, "n_validation": n_val,
                     "validation": f"{args.validation_fraction:g} of the training images, held out", "epochs": args.epochs},
        "rows": rows,
    }, args.out)


if __name__ == "__main__":
    main()
