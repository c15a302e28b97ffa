"""The tutorials' small-data experiment: 300 training images per class, the full test split, 10
epochs of each fine-tuning strategy (linear, partial, full, lp-ft) beside the cached logreg probe on
the same images. Writes results/strategies.json, strategies.md and the charts.

    python benchmarks/strategies.py --data /tmp/cifar10-jpeg              # CPU: lite0 at 96 px, about 20 min
    python benchmarks/strategies.py --data /tmp/cifar10-jpeg --full       # GPU: all 50,000 / 10,000 at 224

lp-ft starts from the cached logreg head (Kumar et al. run the linear probe to convergence with
logistic regression, then fine-tune everything): `probe finetune --strategy lp-ft --init-head RUN`,
all epochs fine-tuning. full and lp-ft train at the learning rates lr_search.py picked on a validation
split held out of the training images (results/lr_search.json), never on the test split. Fine-tuning keeps BatchNorm frozen (the default `--bn frozen`). Each epoch is
evaluated on a fixed subset of --curve-test images; the final models on the whole test split.
Targets (issue 11): full and lp-ft at least 1 point above the cached logreg, lp-ft at least as good as
full, and no epoch of lp-ft more than 2 points below where its linear phase ended (the logreg head).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, folder_subset, small_data_arguments, write_result  # noqa: E402

from probe.compare import compare  # noqa: E402
from probe.extract import extract  # noqa: E402
from probe.finetune import finetune  # noqa: E402
from probe.fit import fit  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small_data_arguments(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--strategies", default="linear,partial,full,lp-ft")
    p.add_argument("--device", default="auto")
    p.add_argument("--curve-test", type=int, default=2000, help="test images of the per-epoch curve")
    p.add_argument("--full", action="store_true", help="all training images at 224 (for a GPU)")
    p.add_argument("--lr-from", type=Path, default=RESULTS / "lr_search.json",
                   help="the learning rates picked on a validation split by lr_search.py (full: backbone, head "
                        "at 10x; lp-ft: every layer); without the file, probe's defaults")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for strategies.json, .md and the charts")
    args = p.parse_args(argv)
    if args.full:
        args.resolution, args.train_per_class = 224, None

    picked = json.loads(args.lr_from.read_text())["picked_lr"] if args.lr_from.exists() else {}
    rates = {"full": {"lr": picked["full"], "head_lr": 10 * picked["full"]}} if "full" in picked else {}
    rates.update({"lp-ft": {"lr": picked["lp-ft"]}} if "lp-ft" in picked else {})
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
            from_head = {"init_head": str(tmp / "logreg")} if strategy == "lp-ft" else {}
            r = finetune(strategy=strategy, **common, epochs=args.epochs, device=args.device, out=str(tmp / strategy),
                         curve_test=args.curve_test, progress=False, **from_head, **rates.get(strategy, {}))
            if from_head:  # its linear phase is the cached logreg: extraction and fit count too
                r.metrics["wall_seconds"] += runs[0].metrics["wall_seconds"]
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
        accuracy = {r.metrics["method"]: r.metrics["test_accuracy"] for r in runs}
        lp_ft = next((r.metrics for r in runs if r.metrics["method"] == "finetune-lp-ft"), None)
        targets = {}
        if "finetune-full" in accuracy and lp_ft:
            probe_acc = accuracy["logreg"]
            targets = {
                "full_at_least_1_point_above_cached_logreg": accuracy["finetune-full"] >= probe_acc + 0.01,
                "lp_ft_at_least_1_point_above_cached_logreg": accuracy["finetune-lp-ft"] >= probe_acc + 0.01,
                "lp_ft_at_least_as_good_as_full": accuracy["finetune-lp-ft"] >= accuracy["finetune-full"],
                # where its linear phase ended: the logreg head it starts from (its test accuracy)
                "no_lp_ft_epoch_2_points_below_its_linear_phase": min(
                    h["test_accuracy"] for h in lp_ft["history"]) >= probe_acc - 0.02,
            }
        best = max(rows, key=lambda r: r["test_accuracy"])
        write_result("strategies", {
            "settings": {"data": str(args.data), "model": args.model, "weights": args.weights,
                         "resolution": args.resolution, "train_per_class": args.train_per_class, "n_test": n_test,
                         "epochs": args.epochs, "device": args.device,
                         "curve_test": args.curve_test,
                         "finetune_defaults": "AdamW, weight decay 1e-4, backbone lr 1e-4, head lr 1e-3, cosine, "
                                              "RandomResizedCrop(0.6-1) + flip, BatchNorm frozen; lp-ft: from the "
                                              "cached logreg head, every epoch fine-tuning",
                         "learning_rates": {s: rates.get(s, "probe's defaults") for s in args.strategies.split(",")},
                         "learning_rates_from": str(args.lr_from) if picked else None},
            "notes": "wall_seconds of the cached logreg include its extraction; lp-ft's include its logreg "
                     "head's. Per-epoch test accuracies are on curve_test images, final ones on all.",
            "targets_met": targets,
            "rows": rows, "best": best["method"], "table_markdown": text,
            "histories": {r.metrics["method"]: r.metrics.get("history") for r in runs},
        }, args.out / "strategies.json")


if __name__ == "__main__":
    main()
