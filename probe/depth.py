"""`probe depth`: where in the network does the task become linearly separable?

Fits logistic regression (with its C sweep) on every layer a cache holds (`probe extract --layers`),
and on its final feature, and draws test accuracy against relative depth, one line per cache: two
backbones, or pretrained against random init, on one chart. Each fit is an ordinary `probe fit` run
folder, and a fit already saved with the same identity (cache, layer and every setting) is read back,
not redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from probe.cache import open_cache
from probe.errors import ProbeError
from probe.files import atomic_write, make_dir, save_png
from probe.fit import fit

FINAL = "final"  # the cache's final feature (train/features), drawn at relative depth 1


def depth(caches: list[str | os.PathLike], *, out: str | os.PathLike = "runs/depth", runs_dir: str = "runs",
          train_per_class: int | None = None, seed: int = 0, device: str = "auto", progress: bool = True) -> dict:
    """Fit logreg on every layer of each cache; write depth.json, depth.md and depth.png under `out`.

    Every cache is opened and checked before any fit. A layer's relative depth is its place among all
    the model's blocks (the cache records them), so layers of caches holding different sets of them
    line up. A fit already in its run folder with the same identity (probe.identity) is read back.

    Returns {"curves": [{"cache", "model", "weights", "points": [{"layer", "depth", "test_accuracy", ...}]}]}.
    """
    if not caches:
        raise ProbeError("give at least one cache file extracted with --layers (probe extract --layers all)")
    opened = [open_cache(path) for path in caches]  # every input checked before any work
    for cache in opened:
        if not cache.layers:
            raise ProbeError(f"{cache.path.name} holds no layers; extract with: probe extract --layers all ...")
    curves = []
    for cache in opened:
        blocks = cache.all_layers or cache.layers  # caches of probe 0.3 recorded only the layers they hold
        points = []
        for layer in [*cache.layers, FINAL]:
            result = fit(head="logreg", features=str(cache.path), layer=None if layer == FINAL else layer,
                         runs_dir=runs_dir, train_per_class=train_per_class, seed=seed, device=device, reuse=True)
            metrics = result.metrics
            if progress:
                print(f"{cache.attrs['model']} {layer}: {metrics['test_accuracy']:.2%}" +
                      (" (reused)" if result.reused else ""), flush=True)
            points.append({"layer": layer, "depth": 1.0 if layer == FINAL else (blocks.index(layer) + 1) / len(blocks),
                           "test_accuracy": metrics["test_accuracy"], "width": metrics["feature_dim"],
                           "interval": (metrics.get("intervals") or {}).get("test_accuracy"),
                           "C": metrics["hyperparameters"].get("C_chosen"), "run": str(result.out)})
        curves.append({"cache": str(cache.path), "model": cache.attrs["model"], "weights": cache.attrs["weights"],
                       "pool": cache.key.get("pool"), "dataset": cache.attrs["dataset"], "points": points})
    result = {"curves": curves, "train_per_class": train_per_class, "seed": seed}
    out = Path(out)
    make_dir(out)
    atomic_write(out / "depth.json", json.dumps(result, indent=2, allow_nan=False).encode())
    atomic_write(out / "depth.md", table(result).encode())
    plot(result, out / "depth.png")
    return result


def table(result: dict) -> str:
    lines = ["| model | weights | pool | layer | relative depth | width | test accuracy |",
             "|---|---|---|---|---:|---:|---:|"]
    for c in result["curves"]:
        for p in c["points"]:
            half = f" ± {100 * (p['interval'][1] - p['interval'][0]) / 2:.1f}" if p.get("interval") else ""
            lines.append(f"| {c['model']} | {c['weights']} | {c.get('pool') or '-'} | {p['layer']} | {p['depth']:.2f} | "
                         f"{p['width']} | {p['test_accuracy']:.2%}{half} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in result["curves"]:
        blocks = [p for p in c["points"] if p["layer"] != FINAL]
        weights = {"default": "pretrained", "none": "random init"}.get(c["weights"], c["weights"])
        label = f"{c['model']} ({weights}" + (f", pool {c['pool']})" if c.get("pool") else ")")
        line, = ax.plot([p["depth"] for p in blocks], [100 * p["test_accuracy"] for p in blocks], marker="o", label=label)
        final = next(p for p in c["points"] if p["layer"] == FINAL)
        ax.plot([1.0], [100 * final["test_accuracy"]], marker="*", markersize=12, color=line.get_color(), linestyle="none")
    ax.set_xlabel("relative depth (block / number of blocks; star: the final feature)")
    ax.set_ylabel("test accuracy of logreg (%)")
    ax.set_title(f"Linear separability by depth on {result['curves'][0]['dataset'].split('/')[-1]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
