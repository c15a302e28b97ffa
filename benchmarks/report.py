"""Write README.md's results section from the JSON files in benchmarks/results/ (never by hand).

    python benchmarks/report.py          # rewrites the part of README.md between the results markers
    python benchmarks/report.py --check  # exit 1 if README.md is not what the result files give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start (benchmarks/report.py writes this) -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(r: dict) -> str:
    m = r["machine"]
    return m["gpu"] if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores"


def _yes(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def speedup(r: dict) -> list[str]:
    s, b, p = r["settings"], r["baseline"], r["probe"]
    fits, x = p["fits"], r["speedup"]
    lines = [
        f"**Speedup** (`{Path('benchmarks/results') / ('speedup_full.json' if s['full'] else 'speedup.json')}`; "
        f"{_machine(r)}): {s['model']} at {s['resolution']} px, {s['n_train']:,} training and {s['n_test']:,} test "
        f"images of the JPEG CIFAR-10, {s['epochs']} epochs for the baseline.",
        "",
        "| | wall seconds | test accuracy |",
        "|---|---:|---:|",
        f"| tutorials' way: backbone every epoch, Linear trained with Adam | {b['seconds']:.1f} "
        f"({b['seconds_per_epoch']:.1f} per epoch) | {b['final_test_accuracy']:.2%} |",
        f"| probe extract (once) | {p['extract_seconds']:.1f} | |",
        f"| probe fit --head logreg (C sweep included) | {fits['logreg']['seconds']:.2f} | {fits['logreg']['test_accuracy']:.2%} |",
        f"| probe fit --head linear | {fits['linear']['seconds']:.2f} | {fits['linear']['test_accuracy']:.2%} |",
        f"| probe fit --head logreg --C (the C the sweep chose) | {fits['logreg_fixed_C']['seconds']:.2f} | "
        f"{fits['logreg_fixed_C']['test_accuracy']:.2%} |",
        "",
        f"First experiment (extract + logreg fit): **{x['first_experiment_logreg']:.1f}x** faster "
        f"(target 10x: {_yes(r['targets_met']['first_experiment_at_least_10x'])}); every later experiment on the "
        f"same cache: **{x['later_experiment_logreg']:.0f}x** with logreg and its sweep (target 500x: "
        f"{_yes(r['targets_met']['later_experiment_at_least_500x'])}), {x['later_experiment_logreg_fixed_C']:.0f}x "
        f"with logreg at the chosen C, {x['later_experiment_linear']:.0f}x with the linear head. Accuracy, "
        f"cached logreg minus baseline: {r['accuracy_points_logreg_minus_baseline']:+.2f} points (target: "
        f"-0.5 or better: {_yes(r['targets_met']['logreg_within_0.5_points_or_better'])}). One backbone pass of "
        f"probe is {x['one_backbone_pass_baseline_epoch_over_extract']:.1f}x faster than one baseline epoch "
        "(batched resizing on the device and channels_last instead of per-image PIL transforms); the rest of the "
        "gain is from running the backbone once instead of every epoch.",
    ]
    return lines


def heads(r: dict) -> list[str]:
    f = r["features"]
    lines = [
        f"**Heads** (`benchmarks/results/heads.json`; {_machine(r)}): {f['n_train']:,} x {f['dim']} training "
        f"features ({f['model']} at {f['resolution']} px on the JPEG CIFAR-10"
        + (f", projected to {f['pca']} dimensions by PCA" if f.get("pca") else "") + f"), {f['n_test']:,} test.",
        "",
        "| head | fit seconds | predict seconds | test accuracy |",
        "|---|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['head']} | {row['fit_seconds']:.2f} | {row['predict_seconds']:.2f} | {row['test_accuracy']:.2%} |")
    lines.append("")
    lines.append("Targets: " + ", ".join(f"{k.replace('_', ' ')}: {_yes(v)}" for k, v in r["targets_met"].items()) + ".")
    return lines


def throughput(r: dict) -> list[str]:
    lines = [
        f"**Extraction** (`benchmarks/results/{'extract_throughput_full' if r['settings']['full'] else 'extract_throughput'}.json`;"
        f" {_machine(r)}; random init, throughput does not depend on the weights):",
        "",
        "| model | resolution | images | images/s | time outside the forward pass |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['resolution']} | {row['images']:,} | {row['images_per_second']:.0f} | "
                     f"{row['share_outside_forward']:.1%} |")
    lines.append("")
    lines.append("Targets: " + ", ".join(f"{k.replace('_', ' ')}: {_yes(v)}" for k, v in r["targets_met"].items()) + ".")
    return lines


def strategies(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"**Strategies** (`benchmarks/results/strategies.json`, chart `benchmarks/results/strategies_accuracy.png`; "
        f"{_machine(r)}): {s['model']} at {s['resolution']} px, {s['train_per_class']} training images per class, "
        f"{s['n_test']:,} test images, {s['epochs']} epochs.",
        "",
        r["table_markdown"].rstrip(),
    ]
    return lines


def render() -> str:
    parts = []
    for name, fn in (("speedup", speedup), ("speedup_full", speedup), ("heads", heads),
                     ("extract_throughput", throughput), ("extract_throughput_full", throughput),
                     ("strategies", strategies)):
        r = _load(name)
        if r is not None:
            parts.append("\n".join(fn(r)))
    return "\n\n".join(parts) if parts else "No benchmark results yet."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    if START not in text or END not in text:
        print(f"{args.readme} has no results markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if args.check:
        if new != text:
            print("README.md's results are not what benchmarks/results/ gives: run python benchmarks/report.py",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    print(f"wrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
