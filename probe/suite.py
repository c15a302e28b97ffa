"""`probe suite`: every model on every data set with every head, in one table.

Each (model, data set) pair is one `probe extract` (a complete cache is reused, an interrupted one
resumes) and each head one `probe fit` into its own run folder under `out` (a finished fit of the same
identity, probe.identity, is read back, not redone). A pair that fails (a download that is impossible, a bad
folder) is reported in the table and at the end, and the suite goes on. The table is the one
`probe compare --pivot` draws from the run folders: suite.csv, suite.md, suite.png (a heatmap), and
suite.json with every pair's status.
"""

from __future__ import annotations

import json
import logging
import os

from probe.backbones import resolve
from probe.compare import load_metrics, pivot, write_pivot
from probe.datasets import check_dataset_name
from probe.errors import ProbeError
from probe.extract import extract
from probe.files import atomic_write, make_dir
from probe.fit import fit
from probe.heads import HEADS, TOKEN_HEADS

log = logging.getLogger("probe")


def suite(*, models: list[str], datasets: list[str], heads: list[str] = ("logreg",), weights: str = "default",
          resolution: int | None = None, train_per_class: int | None = None, seed: int = 0,
          data_dir: str = "data", cache_dir: str = "cache", out: str | os.PathLike = "runs/suite",
          device: str = "auto", progress: bool = True, evaluate: list[str] | None = None) -> dict:
    """Extract and fit every model x data set x head; write the table under `out`.

    Returns suite.json's content: {"pairs": [{model, dataset, head, status, run, test_accuracy | error}],
    "failed": [...the pairs that failed...], "table": the pivot (rows, columns, cells, means)}. evaluate:
    shift sets every model's ImageNet heads are also scored on (probe fit --eval), as columns of the table.
    """
    if not models or not datasets or not heads:
        raise ProbeError("give at least one model, one data set and one head (--models, --datasets, --head)")
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ProbeError(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(HEADS)}")
    on_tokens = [h for h in heads if h in TOKEN_HEADS]
    if on_tokens:
        raise ProbeError(f"--head {on_tokens[0]} reads token maps, which the suite does not extract: run probe extract "
                         "--tokens and probe fit for it")
    for model in models:  # every input checked before any work: a typo fails now, not after an hour
        resolve(model)
    for dataset in datasets:
        check_dataset_name(dataset)
        if dataset.startswith("captions:"):
            raise ProbeError(f"{dataset} is a caption set: it is for probe retrieval, not for the suite's heads")
    out = make_dir(out)
    pairs, runs = [], []
    for dataset in datasets:
        for model in models:
            caches = {}  # pool -> cache; zeroshot reads the image embedding in the text space (the joint pool)
            for head in heads:
                pool = resolve(model).joint_pool if head == "zeroshot" else None
                if pool not in caches:
                    try:
                        caches[pool] = extract(model=model, dataset=dataset, weights=weights, resolution=resolution,
                                               data_dir=data_dir, cache_dir=cache_dir, device=device, progress=progress,
                                               pool=pool).path
                    except ProbeError as e:
                        caches[pool] = e
            for head in heads:
                cache = caches[resolve(model).joint_pool if head == "zeroshot" else None]
                try:  # a finished fit of the same identity in the suite's folder is read back, not redone
                    if isinstance(cache, ProbeError):
                        raise cache
                    shifts = evaluate if evaluate and dataset == "imagenet" and head != "zeroshot" else None
                    for name in shifts or ():  # their caches beside the ImageNet one, with the same options
                        extract(model=model, dataset=name, weights=weights, resolution=resolution, data_dir=data_dir,
                                cache_dir=cache_dir, device=device, progress=progress)
                    result = fit(head=head, features=str(cache), runs_dir=str(out), train_per_class=train_per_class,
                                 seed=seed, device=device, reuse=True, evaluate=shifts)
                except ProbeError as e:  # the pair's extraction failed, or this head's fit
                    log.info(f"{model} on {dataset}, {head}: failed (listed at the end)")
                    pairs.append({"model": _canonical(model), "weights": _recorded_weights(model, weights),
                                  "dataset": dataset, "head": head, "status": "failed", "error": str(e)})
                    continue
                metrics = result.metrics
                log.info(f"{model} on {dataset}, {head}: {metrics['test_accuracy']:.2%}" +
                         (" (reused)" if result.reused else ""))
                pairs.append({"model": metrics["model"], "weights": weights, "dataset": dataset, "head": head,
                              "status": "reused" if result.reused else "done", "run": str(result.out),
                              "identity_hash": metrics["identity_hash"], "test_accuracy": metrics["test_accuracy"]})
                runs.append(result.out)
    failed = [p for p in pairs if p["status"] == "failed"]
    table = pivot(load_metrics(runs) if runs else [], failed)
    write_pivot(table, out)
    result = {"models": list(models), "datasets": list(datasets), "heads": list(heads), "weights": weights,
              "resolution": resolution, "train_per_class": train_per_class, "seed": seed, "pairs": pairs,
              "failed": failed}
    atomic_write(out / "suite.json", json.dumps(result, indent=2, allow_nan=False).encode())
    return {**result, "table": table}


def _recorded_weights(model: str, weights: str) -> str:
    """The weights as a fit of `model` records them (a saved folder's default: default-<content hash>), so a
    failed pair sits in the same table row as the model's other pairs."""
    try:
        return resolve(model).weights_identity(weights)
    except ProbeError:
        return weights


def _canonical(model: str) -> str:
    """The name fits record for `model` (timm:test_vit -> timm:test_vit.r160_in1k), or `model` itself
    when it does not resolve (an unknown name: the failure is what the table shows)."""
    try:
        return resolve(model).name
    except ProbeError:
        return model
