"""The tutorials' small-data experiment: 300 training images per class, the full test split, 10
epochs of each fine-tuning strategy (linear, partial, full, lp-ft) beside the cached logreg probe on
the same images. Writes results/strategies.json, strategies.md and the charts.

    python benchmarks/strategies.py --data /tmp/cifar10-jpeg                     # CPU: lite0 at 64 px
    python benchmarks/strategies.py --data /tmp/cifar10-jpeg --resolution 224 --model resnet18   # GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, folder_subset, write_result  # noqa: E402

from probe.compare import compare  # noqa: E402
from probe.extract import extract  # noqa: E402
from probe.finetune import finetune  # noqa: E402
from probe.fit import fit  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="default")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=None, help="default: the full test split")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--strategies", default="linear,partial,full,lp-ft")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for strategies.json, .md and the charts")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = folder_subset(args.data, tmp / "data", {"train": args.train_per_class, "test": args.test_per_class})
        dataset = f"folder:{data}"
        common = dict(model=args.model, weights=args.weights, resolution=args.resolution, dataset=dataset)
        cache = extract(**common, cache_dir=str(tmp / "cache"), device=args.device, progress=False)
        runs = [fit(head="logreg", features=str(cache.path), out=str(tmp / "logreg"), device=args.device)]
        runs[0].metrics["wall_seconds"] = cache.seconds + runs[0].metrics["fit_seconds"]  # extraction included
        print(f"cached logreg: {runs[0].metrics['test_accuracy']:.4f}")
        for strategy in args.strategies.split(","):
            r = finetune(strategy=strategy, **common, epochs=args.epochs, device=args.device,
                         out=str(tmp / strategy), progress=False)
            print(f"finetune {strategy}: {r.metrics['test_accuracy']:.4f} in {r.metrics['wall_seconds']:.0f} s")
            runs.append(r)
        for r in runs:  # the metrics carry this temporary folder's path; the data set is named in settings
            r.metrics["dataset"] = r.metrics.get("dataset", "").replace(str(data), "subset")
            (r.out / "metrics.json").write_text(json.dumps(r.metrics, indent=2))
        rows, text = compare([r.out for r in runs], out=tmp / "table", plot=tmp / "plots")
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / "plots" / "accuracy.png", args.out / "strategies_accuracy.png")
        shutil.copy(tmp / "plots" / "curves.png", args.out / "strategies_curves.png")
        (args.out / "strategies.md").write_text(text)
        n_test = runs[0].metrics["n_test"]
        best = max(rows, key=lambda r: r["test_accuracy"])
        write_result("strategies", {
            "settings": {"data": str(args.data), "model": args.model, "weights": args.weights,
                         "resolution": args.resolution, "train_per_class": args.train_per_class, "n_test": n_test,
                         "epochs": args.epochs, "device": args.device,
                         "finetune_defaults": "AdamW, weight decay 1e-4, backbone lr 1e-4, head lr 1e-3, cosine, "
                                              "RandomResizedCrop(0.6-1) + flip; lp-ft: 5 head epochs then 5 at 1e-4"},
            "notes": "wall_seconds of the cached logreg include its extraction.",
            "rows": rows, "best": best["method"], "table_markdown": text,
            "histories": {r.metrics["method"]: r.metrics.get("history") for r in runs},
        }, args.out / "strategies.json")


if __name__ == "__main__":
    main()
