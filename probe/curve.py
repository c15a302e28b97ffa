"""`probe curve`: the data-efficiency curve, few-shot episodes over seeds, from one cache in seconds.

For each cache, head and number of labelled images per class k, `seeds` episodes: a class-balanced draw
of k training images per class (probe.selection.balanced_rows: seeded by (seed, class) alone, so the
same images for every model, layer and head on the data set, and nested in k), each fitted by an
ordinary `probe fit` run (its identity holds k as train_per_class and the seed; a finished one is read
back) and scored on the full test split. `all` is the whole training split, fitted once (seed 0).
Where k is too small for logreg's 20% validation split, its C is chosen by k-fold validation on the
episode, and with k = 1 it is fixed (probe.heads.ONE_IMAGE_C; docs/statistics.md says why). kNN on an
episode of k votes among k neighbours. The zeroshot head (an image-text model's cache) is the curve's
k = 0 point: no labelled image, fitted once, drawn as a dashed level across the chart; `logreg+zeroshot`
(and `linear+zeroshot`) is logreg fitted with `--init zeroshot`, a line beside plain logreg's.

Writes curve.json, curve.csv, curve.md (mean ± standard deviation over seeds, and a 95% bootstrap
interval of that mean) and curve.png (test accuracy against labelled images per class, log scale, a
band for the spread over seeds, one line per cache and head).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from probe.cache import open_cache
from probe.errors import ProbeError
from probe.files import atomic_write, make_dir, save_png
from probe.fit import fit
from probe.heads import HEADS
from probe.stats import CONFIDENCE, RESAMPLES, interval_of_mean

DEFAULT_SHOTS = (1, 2, 4, 8, 16, "all")


def parse_shots(text: str | tuple) -> tuple:
    """'1,2,4,8,16,all' -> (1, 2, 4, 8, 16, 'all')."""
    if not isinstance(text, str):
        return tuple(text)
    shots = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        if word == "all":
            shots.append("all")
        elif word.isdigit() and int(word) > 0:
            shots.append(int(word))
        else:
            raise ProbeError(f"--shots {text!r}: give numbers of images per class and/or all, such as 1,2,4,8,16,all")
    if not shots:
        raise ProbeError("--shots: give at least one number of images per class, or all")
    return tuple(sorted(set(s for s in shots if s != "all"))) + (("all",) if "all" in shots else ())


def curve(caches: list[str | os.PathLike], *, heads: list[str] | tuple = ("logreg",), shots=DEFAULT_SHOTS,
          seeds: int = 5, layer: str | None = None, out: str | os.PathLike = "runs/curve", runs_dir: str = "runs",
          device: str = "auto", progress: bool = True) -> dict:
    """Fit every (cache, head, k, seed) episode and write the curve's table and chart under `out`."""
    shots = parse_shots(shots)
    if not caches:
        raise ProbeError("give at least one cache file (probe extract writes them)")
    if seeds < 1:
        raise ProbeError(f"--seeds must be positive, not {seeds}")
    # logreg+zeroshot, linear+zeroshot: the head with --init zeroshot (a line beside the plain head's)
    unknown = [h for h in heads if h not in HEADS and h not in ("logreg+zeroshot", "linear+zeroshot")]
    if unknown:
        raise ProbeError(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(HEADS)}, logreg+zeroshot, "
                         "linear+zeroshot")
    opened = []
    for c in caches:  # every input checked before any work; a cache given twice is one line
        cache = open_cache(c)
        if cache.attrs.get("task") == "segmentation":
            raise ProbeError(f"{cache.path.name} is a segmentation set's cache: probe curve is for classification")
        if all(o.path.resolve() != cache.path.resolve() for o in opened):
            opened.append(cache)
    numeric = [k for k in shots if k != "all"]
    for cache in opened:
        if layer is not None:
            cache.layer_group(layer)
        fewest = int(np.bincount(cache.labels("train")).min())
        if numeric and max(numeric) > fewest:
            held = "" if "test" in cache.splits else " (with no test split, a fifth of them are held out as one)"
            raise ProbeError(f"--shots {max(numeric)}, but a class of {cache.path.name} has only {fewest} training "
                             f"images{held}")
    lines = []
    for cache in opened:
        for head in heads:
            points = []
            for k in (0,) if head == "zeroshot" else shots:
                runs = []
                for seed in (range(seeds) if k not in ("all", 0) else [0]):
                    # kNN on a k-shot episode votes among k neighbours (1-NN for one shot), so it never sees
                    # more neighbours than a class has images; on all of them, its default k.
                    result = fit(head=head.partition("+")[0], features=str(cache.path), layer=layer, runs_dir=runs_dir,
                                 device=device, train_per_class=None if k in ("all", 0) else k, seed=seed, reuse=True,
                                 k=k if head == "knn" and k != "all" else None, init=head.partition("+")[2] or None)
                    runs.append(result.metrics | {"run": str(result.out)})
                accuracies = np.array([r["test_accuracy"] for r in runs])
                point = {"shots": k, "images_per_class": k if k != "all" else runs[0]["n_train"] / len(runs[0]["classes"]),
                         "seeds": len(runs), "mean": float(accuracies.mean()),
                         "std": float(accuracies.std(ddof=1)) if len(runs) > 1 else 0.0,
                         "interval": interval_of_mean(accuracies) if len(runs) > 1 else
                         runs[0].get("intervals", {}).get("test_accuracy"),
                         "accuracies": accuracies.tolist(), "C": [r["hyperparameters"].get("C_chosen") for r in runs],
                         "runs": [r["run"] for r in runs]}
                points.append(point)
                if progress:
                    print(f"{cache.attrs['model']} {head} k={k}: {point['mean']:.2%} ± {100 * point['std']:.1f} "
                          f"({point['seeds']} seed(s))", flush=True)
            lines.append({"cache": str(cache.path), "model": cache.attrs["model"], "weights": cache.attrs["weights"],
                          "dataset": cache.attrs["dataset"], "layer": layer or "final", "head": head, "points": points,
                          "differs": ""})
    # Lines of caches that differ in more than the model: labelled by the key's fields that differ.
    from probe import identity

    fields = identity.differences([c.key for c in opened]) if len(opened) > 1 else []
    fields = [f for f in fields if f not in ("model", "family")]
    for line in lines:
        key = next(c.key for c in opened if str(c.path) == line["cache"])
        line["differs"] = identity.describe(key, fields) if fields else ""
    result = {"lines": lines, "shots": list(shots), "seeds": seeds,
              "interval": f"{CONFIDENCE:.0%} percentile bootstrap of the mean over seeds ({RESAMPLES} resamples); "
                          "for one seed, its bootstrap over test images"}
    out = make_dir(out)
    atomic_write(out / "curve.json", json.dumps(result, indent=2, allow_nan=False).encode())
    atomic_write(out / "curve.csv", table_csv(result).encode())
    atomic_write(out / "curve.md", table_markdown(result).encode())
    plot(result, out / "curve.png")
    return result


def _label(line: dict, lines: list[dict]) -> str:
    # A saved model's folder by its name, not its whole path (hf:/a/b/name, open_clip:local-dir:/a/b/name)
    model = re.sub(r"^((?:open_clip:local-dir:|hf:))/(?:[^/]+/)*", r"\1", line["model"])
    label = f"{model} / {line['head']}"
    if line.get("differs"):
        label += f" [{line['differs']}]"
    return label + (f" / {line['layer']}" if line["layer"] != "final" else "")


def table_markdown(result: dict) -> str:
    present = {p["shots"] for line in result["lines"] for p in line["points"]}
    shots = [k for k in [0, *result["shots"]] if k in present]
    rows = ["| model / head | " + " | ".join({0: "0 (zero-shot)", "all": "all"}.get(k, f"{k} per class") for k in shots)
            + " |", "|---|" + "---:|" * len(shots)]
    for line in result["lines"]:
        cells = []
        at = {p["shots"]: p for p in line["points"]}
        for p in (at.get(k) for k in shots):
            interval = f" [{100 * p['interval'][0]:.1f}, {100 * p['interval'][1]:.1f}]" if p and p["interval"] else ""
            cells.append(f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}{interval}" if p else "")
        rows.append(f"| {_label(line, result['lines'])} | " + " | ".join(cells) + " |")
    zero = " (zero-shot: one fit, no labelled image)" if 0 in present else ""
    return "\n".join(rows) + (f"\n\nTest accuracy (%): mean ± standard deviation over {result['seeds']} seeds{zero}, "
                              f"[the {result['interval']}].\n")


def table_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "weights", "layer", "head", "cache", "differs", "shots", "seeds", "mean", "std",
                     "interval_low", "interval_high"])
    for line in result["lines"]:
        for p in line["points"]:
            low, high = p["interval"] or ("", "")
            writer.writerow([line["model"], line["weights"], line["layer"], line["head"], line["cache"], line["differs"],
                             p["shots"], p["seeds"], p["mean"], p["std"], low, high])
    return buffer.getvalue()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, line in enumerate(result["lines"]):
        color = f"C{i % 10}"  # one colour per line, zero-shot levels included
        if line["points"][0]["shots"] == 0:  # zero-shot: no labelled image, a level on a log axis
            ax.axhline(100 * line["points"][0]["mean"], linestyle="--", color=color,
                       label=f"{_label(line, result['lines'])} (0 labelled images)")
            continue
        x = [p["images_per_class"] for p in line["points"]]
        mean = np.array([100 * p["mean"] for p in line["points"]])
        spread = np.array([100 * p["std"] for p in line["points"]])
        ax.plot(x, mean, marker="o", color=color, label=_label(line, result["lines"]))
        ax.fill_between(x, mean - spread, mean + spread, color=color, alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per class (log scale" +
                  ("; the last point: all of them)" if "all" in result["shots"] else ")"))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Data efficiency (band: ± one standard deviation over {result['seeds']} seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_png(fig, path)
