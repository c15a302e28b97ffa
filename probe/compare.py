"""`probe compare`: the metrics of any runs (fits and fine-tunes) in one table, and charts drawn from it;
with --pivot, the suite table (a row per model and head, a column per data set, the mean) and its
heatmap, from run folders or whole folders of earlier suites: the one reader `probe suite` uses too."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from probe import identity
from probe.errors import ProbeError
from probe.files import atomic_write, make_dir, save_png

COLUMNS = ("method", "model", "resolution", "trainable_parameters", "n_train", "test_accuracy", "test_accuracy_low",
           "test_accuracy_high", "ece", "wall_seconds")
SHOWN = ("method", "model", "resolution", "trainable_parameters", "n_train", "test_accuracy", "ece", "wall_seconds")


def load_metrics(paths: list[str | os.PathLike]) -> list[dict]:
    """metrics.json files, run folders holding one, or folders of run folders (an earlier suite's)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "metrics.json").exists():
            found = sorted(path.rglob("metrics.json"))
            if not found:
                raise ProbeError(f"{path} holds no metrics.json; give run folders of probe fit, probe finetune or "
                                 "probe suite")
            files += found
        else:
            files.append(path / "metrics.json" if path.is_dir() else path)
    runs = []
    for file in files:
        try:
            metrics = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ProbeError(f"cannot read run metrics {file} ({type(e).__name__}); give run folders of probe fit "
                             "or probe finetune, or their metrics.json") from None
        if not isinstance(metrics, dict) or not isinstance(metrics.get("test_accuracy"), (int, float)) \
                or not all(isinstance(metrics.get(k), str) for k in ("method", "model")):
            raise ProbeError(f"{file} is not a metrics.json of probe fit or probe finetune")
        runs.append({**metrics, "path": str(file)})
    return runs


def with_interval(m: dict, key: str = "test_accuracy") -> str:
    """`72.40% ± 3.0`: a metric and the half-width of its 95% interval in points (runs of probe 0.3 have none)."""
    value, interval = m.get(key), (m.get("intervals") or {}).get(key)
    if value is None:
        return "-"
    if not interval:
        return f"{value:.2%}"
    return f"{value:.2%} ± {100 * (interval[1] - interval[0]) / 2:.1f}"


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        low, high = (r.get("intervals") or {}).get("test_accuracy") or (None, None)
        rows.append({**{c: r.get(c) for c in COLUMNS}, "test_accuracy_low": low, "test_accuracy_high": high,
                     "ece": (r.get("calibration") or {}).get("ece"), "_run": r})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    for r in rows:
        cells = [with_interval(r["_run"]) if c == "test_accuracy" else
                 f"{r[c]:.3f}" if c == "ece" and r[c] is not None else
                 f"{r[c]:.1f}" if c == "wall_seconds" and r[c] is not None else
                 f"{r[c]:,}" if c == "trainable_parameters" and r[c] is not None else
                 "-" if r[c] is None else str(r[c]) for c in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    confused = [(r["_run"], r["_run"].get("most_confused")) for r in rows if r["_run"].get("most_confused")]
    for run, pairs in confused:
        lines.append(f"\n{run['method']} on {run['model']}, most confused (true -> predicted): " + ", ".join(
            f"{p['true']} -> {p['predicted']} {p['count']}" for p in pairs))
    return "\n".join(lines) + "\n"


def paired(runs: list[dict]) -> list[dict]:
    """Each run against the first, on the same test images: the accuracy difference with a paired bootstrap
    95% interval and McNemar's exact p-value (probe.stats). Runs scored on other test images are refused."""
    from probe import stats
    from probe.runs import load_predictions

    base = runs[0]
    if len(runs) < 2:
        raise ProbeError("--paired compares runs with the first: give at least two")
    dense = next((r for r in runs if r.get("task") == "segmentation"), None)
    if dense is not None:
        raise ProbeError(f"{Path(dense['path']).parent} is a segmentation run: --paired compares classification runs "
                         "image by image (a seg-linear run's mIoU has its interval in metrics.json)")
    base_predictions = load_predictions(Path(base["path"]).parent)
    out = []
    for run in runs[1:]:
        if not base.get("test_set_hash") or run.get("test_set_hash") != base.get("test_set_hash"):
            raise ProbeError(f"{Path(run['path']).parent} is scored on other test images than "
                             f"{Path(base['path']).parent} (another data set, split, class selection or probe 0.3 "
                             "run): a paired comparison needs the same ones")
        other = load_predictions(Path(run["path"]).parent)
        truth = base_predictions["true"]
        result = stats.paired_difference(truth, base_predictions["predicted"] == truth, other["predicted"] == truth)
        out.append({"a": str(Path(base["path"]).parent), "b": str(Path(run["path"]).parent),
                    "a_method": base["method"], "b_method": run["method"], "a_model": base["model"],
                    "b_model": run["model"], **result})
    return out


def paired_markdown(rows: list[dict]) -> str:
    lines = ["| A | B | accuracy A - B | 95% interval (paired bootstrap) | A right, B wrong | B right, A wrong | "
             "McNemar p |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['a_method']} on {r['a_model']} ({Path(r['a']).name}) | {r['b_method']} on {r['b_model']} "
                     f"({Path(r['b']).name}) | "
                     f"{100 * r['difference']:+.2f} points | [{100 * r['interval'][0]:+.2f}, {100 * r['interval'][1]:+.2f}] | "
                     f"{r['only_a_right']} | {r['only_b_right']} | {r['mcnemar_p']:.3g} |")
    return "\n".join(lines) + "\n"


def compare(paths: list[str | os.PathLike], *, out: str | os.PathLike = "runs/compare",
            plot: str | os.PathLike | None = None, paired_with_first: bool = False) -> tuple[list[dict], str]:
    """Merge runs into one table, saved as out/compare.csv and out/compare.md; with plot, PNG charts too;
    paired_with_first: each run against the first on the same test images (out/paired.csv, paired.md)."""
    if not paths:
        raise ProbeError("give at least one run folder or metrics.json")
    runs = load_metrics(paths)
    pairs = paired(runs) if paired_with_first else None  # refused before anything is written
    rows = table(runs)
    out = Path(out)
    make_dir(out)
    if plot is not None:  # both folders made before any file is written
        make_dir(plot)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "compare.csv", buffer.getvalue().encode())
    text = markdown(rows)
    if pairs is not None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[k for k in pairs[0] if k not in ("method",)], extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{**p, "interval": f"{p['interval'][0]} {p['interval'][1]}"} for p in pairs])
        atomic_write(out / "paired.csv", buffer.getvalue().encode())
        atomic_write(out / "paired.md", paired_markdown(pairs).encode())
        text += "\n" + paired_markdown(pairs)
    atomic_write(out / "compare.md", text.encode())
    if plot is not None:
        draw(runs, Path(plot))
    return rows, text


def draw(runs: list[dict], folder: Path) -> list[Path]:
    """accuracy.png: test accuracy per method; curves.png: fine-tunes' test accuracy per epoch; for fits,
    reliability.png and a confusion matrix each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    make_dir(folder)
    labels = [f"{r['method']}\n{r['model']}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(runs)), 3.6))
    bars = ax.bar(range(len(runs)), [100 * r["test_accuracy"] for r in runs], color="#4C72B0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("test accuracy per method")
    written = [save_png(fig, folder / "accuracy.png")]

    tuned = [r for r in runs if r.get("history")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in tuned:
        epochs = [h["epoch"] for h in r["history"]]
        line, = ax.plot(epochs, [100 * h["test_accuracy"] for h in r["history"]], marker="o", label=r["method"])
        if r.get("lp_epochs"):
            ax.axvline(r["lp_epochs"] + 0.5, color=line.get_color(), linestyle="--", linewidth=1)
            ax.annotate("head -> full", (r["lp_epochs"] + 0.5, ax.get_ylim()[0]), fontsize=7, rotation=90,
                        va="bottom", ha="right", color=line.get_color())
    for r in runs:
        if not r.get("history"):  # a cached probe has no epochs: a horizontal reference line
            ax.axhline(100 * r["test_accuracy"], color="gray", linestyle=":", linewidth=1)
            ax.annotate(r["method"], (1, 100 * r["test_accuracy"]), fontsize=7, color="gray", va="bottom")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("learning curves (dashed: lp-ft's switch to full fine-tuning)")
    if tuned:
        ax.legend(fontsize=8)
    written.append(save_png(fig, folder / "curves.png"))
    return written + _draw_calibration(runs, folder)


def _draw_calibration(runs: list[dict], folder: Path) -> list[Path]:
    """reliability.png: accuracy against confidence in 15 bins, one line per fit; confusion_<i>.png: each
    fit's confusion matrix, normalized per true class (from predictions.h5 and metrics.json)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from probe import stats
    from probe.runs import load_predictions

    fits = [r for r in runs if r.get("kind") == "fit" and (Path(r["path"]).parent / "predictions.h5").exists()]
    if not fits:
        return []
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    for r in fits:
        p = load_predictions(Path(r["path"]).parent)
        bins = [b for b in stats.reliability(p["top_k_probability"][:, 0], p["predicted"] == p["true"]) if b["n"]]
        ece = (r.get("calibration") or {}).get("ece")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                label=f"{r['method']} {r['model']}" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.set_xlabel("confidence (top-1 probability, 15 bins)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability")
    ax.legend(fontsize=7)
    written = [save_png(fig, folder / "reliability.png")]
    for i, r in enumerate(fits):
        m = np.asarray(r["confusion_matrix"], np.float64)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        size = min(12, 2 + 0.45 * len(m))
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(m)), r["classes"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(m)), r["classes"], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (each row sums to 1)")
        ax.set_title(f"{r['method']} on {r['model']}", fontsize=9)
        written.append(save_png(fig, folder / f"confusion_{i}.png"))
    return written


def dataset_label(name: str) -> str:
    """A data set's name for a table column: folders by their last part (folder:cifar10-jpeg)."""
    for prefix in ("folder:", "hf:"):
        if name.startswith(prefix) and Path(name[len(prefix):].split("@")[0]).is_absolute():
            return prefix + Path(name[len(prefix):]).name
    return name


# The fields of a fit's identity that say which data set (and split) it was measured on: its column.
DATA_FIELDS = ("cache.dataset", "cache.fingerprint", "cache.protocol")


def _told_apart(labels: list, specs: list[dict], relabel) -> list:
    """Labels of runs, where runs of one label have different specs: each relabelled (relabel(label,
    'field=value, ...')) by the fields in which those specs differ."""
    out = list(labels)
    for label in set(labels):
        distinct = {identity.canonical(spec): spec for spec, lab in zip(specs, labels) if lab == label}
        if len(distinct) > 1:
            fields = identity.differences(list(distinct.values()))
            for i, (spec, lab) in enumerate(zip(specs, labels)):
                if lab == label:
                    out[i] = relabel(label, identity.describe(spec, fields))
    return out


def _identity_parts(run: dict) -> tuple[dict, dict]:
    """(column part, row part) of a run's identity, flattened; a run of probe 0.3 or older has none and
    is a row of its own (its path)."""
    spec = run.get("identity")
    if not isinstance(spec, dict):
        return {"dataset": run.get("dataset", "?")}, {"run without identity (probe 0.3 or older)": run["path"]}
    flat = identity.flatten(spec)
    return ({k: v for k, v in flat.items() if k in DATA_FIELDS},
            {k: v for k, v in flat.items() if k not in DATA_FIELDS})


def with_shift_columns(runs: list[dict]) -> list[dict]:
    """Each run's scores on shift sets (probe fit --eval) as runs of those data sets, so they are columns of
    the suite table beside the run's own; they have no per-image predictions to compare pairwise."""
    out = []
    for r in runs:
        out.append(r)
        for name, s in (r.get("shift") or {}).items():
            out.append({**r, "dataset": name, "test_accuracy": s["test_accuracy"],
                        "intervals": {"test_accuracy": s["interval"]}, "test_set_hash": None, "shift": None})
    return out


def pivot(runs: list[dict], failures: list[dict] = (), merge: bool = False) -> dict:
    """The suite table: a row per model (with its weights, if not the default) and head, a column per data
    set, test accuracy in the cells ("failed" for a pair in `failures`), and each row's mean.

    Runs are told apart by their whole identity (probe.identity): two runs of one model and head that
    differ in any other field (train-per-class, seed, layer, resolution, C, ...) are two rows, labelled
    by the fields that differ; two data sets of one name that differ (another content fingerprint) two
    columns. Runs of the very same identity are one cell: the newest by its recorded time is shown, and
    a note says so. merge: one row per model and head and one column per data set name, whatever else
    differs; the newest run of each cell is shown and the notes name the fields that were merged over.
    """
    base = lambda model, weights, head: (f"{model} ({weights})" if weights not in (None, "default") else model, head)  # noqa: E731
    runs = with_shift_columns(runs)
    parts = [_identity_parts(r) for r in runs]
    # Columns: by short name (folder:cifar10-jpeg), by whole name where two short names clash, and by the
    # differing fields where two data sets of one name differ in content or protocol.
    names = {r.get("dataset", "?") for r in runs} | {f["dataset"] for f in failures}
    shorts = [dataset_label(n) for n in names]
    label = {n: dataset_label(n) if shorts.count(dataset_label(n)) == 1 else n for n in names}
    column_of = [label[r.get("dataset", "?")] for r in runs]
    row_of = [base(r["model"], r.get("weights"), r["method"]) for r in runs]
    if not merge:
        column_of = _told_apart(column_of, [c for c, _ in parts], lambda name, what: f"{name} ({what})")
        # Rows: model and head, and the fields in which runs of that model and head differ.
        row_of = _told_apart(row_of, [rp for _, rp in parts], lambda key, what: (f"{key[0]} [{what}]", key[1]))
    cells, chosen, rows, columns, notes = {}, {}, [], [], []
    for r, row, column in zip(runs, row_of, column_of):
        if row not in rows:
            rows.append(row)
        if column not in columns:
            columns.append(column)
        chosen.setdefault((row, column), []).append(r)
    shown = {}
    for (row, column), candidates in chosen.items():
        newest = max(candidates, key=lambda r: r.get("created", ""))
        cells[row, column] = newest["mean_iou"] if newest.get("task") == "segmentation" else newest["test_accuracy"]
        shown[row, column] = newest
        if len(candidates) > 1:
            specs = [r.get("identity") or {"path": r["path"]} for r in candidates]
            fields = identity.differences(specs)
            what = f"differing in {', '.join(fields)}" if fields else "of the same identity"
            notes.append(f"{row[0]} / {row[1]} on {column}: {len(candidates)} runs {what}; the newest "
                         f"({newest.get('created', '?')}, {newest['path']}) is shown")
    for f in failures:
        row, column = base(f["model"], f.get("weights"), f["head"]), label[f["dataset"]]
        for item, where in ((row, rows), (column, columns)):
            if item not in where:
                where.append(item)
        cells.setdefault((row, column), "failed")
    means = {}
    for row in rows:
        values = [cells[row, c] for c in columns if isinstance(cells.get((row, c)), float)]
        means[row] = (sum(values) / len(values), len(values)) if values else (None, 0)
    if any(r.get("task") == "segmentation" for r in shown.values()):
        notes.append("segmentation runs (seg-linear): their cells are mIoU, not accuracy")
    return {"rows": rows, "columns": columns, "cells": cells, "means": means, "notes": notes,
            "intervals": {cell: (r.get("intervals") or {}).get("mean_iou" if r.get("task") == "segmentation" else
                                                               "test_accuracy") for cell, r in shown.items()},
            "best": _not_below_best(shown, columns)}


def _not_below_best(shown: dict, columns: list) -> list:
    """The cells not significantly below the best run on the same test images: for each data set and each
    set of test images in it (another class selection is another set), its best, and every run whose
    paired bootstrap interval of (best - it) reaches 0. A run without predictions.h5 (probe 0.3) can be the
    best but is compared with nothing."""
    from probe import stats
    from probe.runs import load_predictions

    marked = []
    for column in columns:
        groups = {}
        for cell, r in shown.items():
            if cell[1] == column:
                groups.setdefault(r.get("test_set_hash") or r["path"], []).append((cell, r))
        for here in groups.values():
            best_cell, best = max(here, key=lambda item: item[1]["test_accuracy"])
            marked.append(best_cell)
            has = lambda r: bool(r.get("test_set_hash")) and (Path(r["path"]).parent / "predictions.h5").exists()  # noqa: E731
            if not has(best):
                continue
            b = load_predictions(Path(best["path"]).parent)
            truth, best_right = b["true"], b["predicted"] == b["true"]
            for cell, r in here:
                if cell != best_cell and has(r):
                    other = load_predictions(Path(r["path"]).parent)
                    if stats.paired_difference(truth, best_right, other["predicted"] == truth)["interval"][0] <= 0:
                        marked.append(cell)
    return marked


def pivot_markdown(table: dict) -> str:
    def cell(value, at=None):
        if value is None or isinstance(value, str):
            return "-" if value is None else value
        interval = table.get("intervals", {}).get(at) if at else None
        text = f"{value:.2%}" + (f" ± {100 * (interval[1] - interval[0]) / 2:.1f}" if interval else "")
        return f"**{text}**" if at in table.get("best", ()) else text

    n = len(table["columns"])
    lines = ["| model | head | " + " | ".join(table["columns"]) + " | mean |", "|---|---|" + "---:|" * (n + 1)]
    for row in table["rows"]:
        mean, count = table["means"][row]
        note = "" if count == n or mean is None else f" ({count} of {n})"
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cell(table["cells"].get((row, c)), (row, c))
                                                             for c in table["columns"])
                     + f" | {cell(mean)}{note} |")
    if table.get("best"):
        lines += ["", "Bold: the best of its data set (of each set of test images in it), and every run on the same "
                  "test images not significantly below it (a paired bootstrap 95% interval of the difference that "
                  "reaches 0). ±: half the 95% interval, in points."]
    lines += ["", *(f"- {n}" for n in table.get("notes", []))] if table.get("notes") else []
    return "\n".join(lines) + "\n"


def pivot_csv(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "head", *table["columns"], "mean", "datasets_in_mean"])
    for row in table["rows"]:
        mean, count = table["means"][row]
        writer.writerow([*row, *(table["cells"].get((row, c), "") for c in table["columns"]),
                         "" if mean is None else mean, count])
    return buffer.getvalue()


def heatmap(table: dict, path: Path) -> Path:
    """Test accuracy per model/head (rows) and data set (columns, and the mean), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = [*table["columns"], "mean"]
    values = np.full((len(table["rows"]), len(columns)), np.nan)
    for i, row in enumerate(table["rows"]):
        for j, c in enumerate(table["columns"]):
            v = table["cells"].get((row, c))
            values[i, j] = 100 * v if isinstance(v, float) else np.nan
        mean = table["means"][row][0]
        values[i, -1] = np.nan if mean is None else 100 * mean
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(columns), 1.0 + 0.5 * len(table["rows"])))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e0e0e0")  # a failed or missing pair: grey
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(table["rows"]):
        for j, c in enumerate(columns):
            missing = np.isnan(values[i, j])
            text = ("failed" if table["cells"].get((row, c)) == "failed" else "-") if missing else f"{values[i, j]:.1f}"
            text += "*" if (row, c) in table.get("best", ()) else ""
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="#444444" if missing else "black" if values[i, j] > 60 else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(table["rows"])), [f"{m} / {h}" for m, h in table["rows"]], fontsize=8)
    ax.set_title("test accuracy (%); *: best of its data set, or not significantly below", fontsize=9)
    return save_png(fig, path)


def compare_pivot(paths: list[str | os.PathLike], *, out: str | os.PathLike = "runs/compare",
                  merge: bool = False) -> tuple[dict, str]:
    """`probe compare --pivot`: the suite table of runs or whole suite folders as suite.csv, suite.md and
    suite.png under `out`; runs that differ in any field of their identity stay apart unless `merge`."""
    if not paths:
        raise ProbeError("give at least one run folder, suite folder or metrics.json")
    result = pivot([r for r in load_metrics(paths) if r.get("kind") == "fit"], merge=merge)
    if not result["rows"]:
        raise ProbeError("no probe fit runs among them (the suite table is of fitted heads)")
    return result, write_pivot(result, Path(out))


def write_pivot(result: dict, out: Path) -> str:
    make_dir(out)
    text = pivot_markdown(result)
    atomic_write(out / "suite.csv", pivot_csv(result).encode())
    atomic_write(out / "suite.md", text.encode())
    heatmap(result, out / "suite.png")
    return text
