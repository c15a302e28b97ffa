"""`probe compare`: the metrics of any runs (fits and fine-tunes) in one table, and charts drawn from it."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from probe.errors import ProbeError
from probe.files import atomic_write, make_dir

COLUMNS = ("method", "model", "resolution", "trainable_parameters", "n_train", "test_accuracy", "wall_seconds")


def load_metrics(paths: list[str | os.PathLike]) -> list[dict]:
    """metrics.json files, or run folders holding one."""
    runs = []
    for path in map(Path, paths):
        file = path / "metrics.json" if path.is_dir() else path
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
