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
from probe.files import atomic_write, make_dir

COLUMNS = ("method", "model", "resolution", "trainable_parameters", "n_train", "test_accuracy", "wall_seconds")


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


def table(runs: list[dict]) -> list[dict]:
    return [{c: r.get(c) for c in COLUMNS} for r in runs]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r['test_accuracy']:.2%}" if c == "test_accuracy" else
                 f"{r[c]:.1f}" if c == "wall_seconds" and r[c] is not None else
                 f"{r[c]:,}" if c == "trainable_parameters" and r[c] is not None else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(paths: list[str | os.PathLike], *, out: str | os.PathLike = "runs/compare",
            plot: str | os.PathLike | None = None) -> tuple[list[dict], str]:
    """Merge runs into one table, saved as out/compare.csv and out/compare.md; with plot, PNG charts too."""
    if not paths:
        raise ProbeError("give at least one run folder or metrics.json")
    runs = load_metrics(paths)
    rows = table(runs)
    out = Path(out)
    make_dir(out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "compare.csv", buffer.getvalue().encode())
    text = markdown(rows)
    atomic_write(out / "compare.md", text.encode())
    if plot is not None:
        draw(runs, Path(plot))
    return rows, text


def _save_png(fig, path: Path) -> Path:
    """Render to memory, then write atomically (a full disk is a one-line error, not a half PNG)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def draw(runs: list[dict], folder: Path) -> list[Path]:
    """accuracy.png: test accuracy per method; curves.png: fine-tunes' test accuracy per epoch."""
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
    fig.tight_layout()
    written = [_save_png(fig, folder / "accuracy.png")]

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
    fig.tight_layout()
    written.append(_save_png(fig, folder / "curves.png"))
    return written


def dataset_label(name: str) -> str:
    """A data set's name for a table column: folders by their last part (folder:cifar10-jpeg)."""
    for prefix in ("folder:", "hf:"):
        if name.startswith(prefix) and Path(name[len(prefix):].split("@")[0]).is_absolute():
            return prefix + Path(name[len(prefix):]).name
    return name


# The fields of a fit's identity that say which data set (and split) it was measured on: its column.
DATA_FIELDS = ("cache.dataset", "cache.fingerprint", "cache.protocol")


def _identity_parts(run: dict) -> tuple[dict, dict]:
    """(column part, row part) of a run's identity, flattened; a run of probe 0.3 or older has none and
    is a row of its own (its path)."""
    spec = run.get("identity")
    if not isinstance(spec, dict):
        return {"dataset": run.get("dataset", "?")}, {"run without identity (probe 0.3 or older)": run["path"]}
    flat = identity.flatten(spec)
    return ({k: v for k, v in flat.items() if k in DATA_FIELDS},
            {k: v for k, v in flat.items() if k not in DATA_FIELDS})


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
    parts = [_identity_parts(r) for r in runs]
    # Columns: by short name (folder:cifar10-jpeg), by whole name where two short names clash, and by the
    # differing fields where two data sets of one name differ in content or protocol.
    names = {r.get("dataset", "?") for r in runs} | {f["dataset"] for f in failures}
    shorts = [dataset_label(n) for n in names]
    label = {n: dataset_label(n) if shorts.count(dataset_label(n)) == 1 else n for n in names}
    column_of = [label[r.get("dataset", "?")] for r in runs]
    if not merge:
        for name in set(column_of):
            specs = {identity.canonical(c): c for (c, _), col in zip(parts, column_of) if col == name}
            if len(specs) > 1:
                fields = identity.differences(list(specs.values()))
                for i, ((c, _), col) in enumerate(zip(parts, column_of)):
                    if col == name:
                        column_of[i] = f"{name} ({identity.describe(c, fields)})"
    # Rows: model and head, and the fields in which runs of that model and head differ.
    row_of = [base(r["model"], r.get("weights"), r["method"]) for r in runs]
    if not merge:
        for key in set(row_of):
            specs = {identity.canonical(rp): rp for (_, rp), rk in zip(parts, row_of) if rk == key}
            if len(specs) > 1:
                fields = identity.differences(list(specs.values()))
                for i, ((_, rp), rk) in enumerate(zip(parts, row_of)):
                    if rk == key:
                        row_of[i] = (f"{key[0]} [{identity.describe(rp, fields)}]", key[1])
    cells, chosen, rows, columns, notes = {}, {}, [], [], []
    for r, row, column in zip(runs, row_of, column_of):
        if row not in rows:
            rows.append(row)
        if column not in columns:
            columns.append(column)
        chosen.setdefault((row, column), []).append(r)
    for (row, column), candidates in chosen.items():
        newest = max(candidates, key=lambda r: r.get("created", ""))
        cells[row, column] = newest["test_accuracy"]
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
    return {"rows": rows, "columns": columns, "cells": cells, "means": means, "notes": notes}


def pivot_markdown(table: dict) -> str:
    def cell(value):
        return "-" if value is None else value if isinstance(value, str) else f"{value:.2%}"

    n = len(table["columns"])
    lines = ["| model | head | " + " | ".join(table["columns"]) + " | mean |", "|---|---|" + "---:|" * (n + 1)]
    for row in table["rows"]:
        mean, count = table["means"][row]
        note = "" if count == n or mean is None else f" ({count} of {n})"
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cell(table["cells"].get((row, c))) for c in table["columns"])
                     + f" | {cell(mean)}{note} |")
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
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="#444444" if missing else "black" if values[i, j] > 60 else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(table["rows"])), [f"{m} / {h}" for m, h in table["rows"]], fontsize=8)
    ax.set_title("test accuracy (%)")
    fig.tight_layout()
    return _save_png(fig, path)


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
