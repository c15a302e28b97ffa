"""The attentive probe on cached tokens against the pooled-feature logreg, and what an epoch costs from
the token cache against an epoch that runs the backbone: same head, same images, one run.

    python benchmarks/tokens.py --data /tmp/cifar10-jpeg        # lite0's 7x7x1280 map at 224 px, 500 per class

1. `probe extract --tokens` once over the training subset and the test split (the pooled features and
   the token maps in one pass), then `probe fit --head logreg` (pooled) and `probe fit --head attentive`
   (tokens) on that one cache.
2. One training epoch of the same attentive head (probe.attentive, AdamW, batches of 256, the same
   images in the same order) two ways: reading the cached token maps from the HDF5 file, and decoding,
   resizing and running the frozen backbone for them, as a probe without a cache does every epoch.
Target (issue 25): the attentive probe scores at least the logreg, and one epoch on the cache costs at
most a tenth of one epoch that runs the backbone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, small_data_arguments, write_result  # noqa: E402

from probe.attentive import AttentivePooler  # noqa: E402
from probe.backbones import Preprocess  # noqa: E402
from probe.batches import iter_batches  # noqa: E402
from probe.cache import open_cache  # noqa: E402
from probe.datasets import load_dataset  # noqa: E402
from probe.extract import Embedder, extract  # noqa: E402
from probe.fit import fit  # noqa: E402

BATCH = 256


def epoch(head, optimizer, batches) -> float:
    """Seconds of one training epoch of `head` over batches() of (tokens [B, T * C], labels)."""
    t0 = time.perf_counter()
    for X, y in batches():
        loss = torch.nn.functional.cross_entropy(head(X), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small_data_arguments(p)
    p.set_defaults(resolution=None, train_per_class=500)  # lite0's own 224 px: its 7 x 7 map; the issue's 5,000 images
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = folder_subset(args.data, tmp / "data", {"train": args.train_per_class, "test": args.test_per_class})
        t0 = time.perf_counter()
        made = extract(model=args.model, weights=args.weights, resolution=args.resolution, dataset=f"folder:{data}",
                       tokens=True, cache_dir=str(tmp / "cache"), device=args.device)
        extract_seconds = time.perf_counter() - t0
        cache = open_cache(made.path)
        cache_bytes = cache.path.stat().st_size
        rows = []
        for head in ("logreg", "attentive"):
            m = fit(head=head, features=str(cache.path), out=str(tmp / head), device=args.device).metrics
            rows.append({"head": head, "on": "token maps" if head == "attentive" else "pooled features",
                         "test_accuracy": m["test_accuracy"], "interval": m["intervals"]["test_accuracy"],
                         "fit_seconds": m["fit_seconds"], "n_train": m["n_train"], "n_test": m["n_test"],
                         "hyperparameters": {k: v for k, v in m["hyperparameters"].items() if k != "sweep"}})
            print(f"{head}: {m['test_accuracy']:.4f} in {m['fit_seconds']:.0f} s", flush=True)

        # 2. One epoch of the same head, from the cache and through the backbone.
        G, _, C = cache.token_shape
        with h5py.File(cache.path, "r") as f:
            labels = torch.from_numpy(f["train/labels"][...])
        n = len(labels)

        def cached():
            with h5py.File(cache.path, "r") as f:
                tokens = f["train/tokens"]
                for i in range(0, n, BATCH):
                    yield torch.from_numpy(tokens[i:i + BATCH].astype(np.float32)), labels[i:i + BATCH]

        pre = Preprocess.from_dict(cache.key["preprocessing"], cache.key["resolution"])
        device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        embed = Embedder(cache.key["model"], args.weights, pre, cache.key["pool"], device, tokens=cache.key["tokens"]["grid"])
        split = load_dataset(f"folder:{data}").splits["train"]

        def through_backbone():
            row = 0
            for images in iter_batches(split, pre, BATCH, device):
                embed(images)
                yield embed.last_tokens.clone(), labels[row:row + len(images)]  # out of inference mode
                row += len(images)

        seconds = {}
        for name, batches in (("cache", cached), ("backbone", through_backbone), ("cache_again", cached)):
            torch.manual_seed(0)
            head = AttentivePooler(C, G * G, 16, 1, 4.0, len(cache.classes)).to(device)
            optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
            seconds[name] = epoch(head, optimizer, batches)
            print(f"one epoch, {name}: {seconds[name]:.1f} s", flush=True)
    logreg, attentive = rows
    cache_epoch = min(seconds["cache"], seconds["cache_again"])
    write_result("tokens", {
        "settings": {"data": str(args.data), "model": args.model, "weights": args.weights,
                     "resolution": cache.key["resolution"], "token_shape": [G, G, C],
                     "token_dtype": cache.key["tokens"]["dtype"], "train_per_class": args.train_per_class,
                     "n_train": n, "n_test": logreg["n_test"], "batch_size": BATCH, "device": str(device)},
        "extract_seconds": extract_seconds, "cache_bytes": cache_bytes,
        "rows": rows,
        "epoch_seconds": {"from_the_token_cache": cache_epoch, "running_the_backbone": seconds["backbone"],
                          "cache_runs": [seconds["cache"], seconds["cache_again"]]},
        "epoch_cost_ratio": cache_epoch / seconds["backbone"],
        "notes": "epoch_seconds: one training epoch of the same AttentivePooler (AdamW, batches of 256, the same "
                 "images in order), its tokens read from the HDF5 cache (float16 to float32) or made by decoding, "
                 "resizing and running the frozen backbone; the cache epoch is the faster of two runs, one before "
                 "and one after the backbone epoch. fit_seconds: probe fit's whole training (attentive: its "
                 "epochs or 300 steps, whichever is more).",
        "targets_met": {
            "attentive_at_least_logreg": attentive["test_accuracy"] >= logreg["test_accuracy"],
            "cache_epoch_at_most_a_tenth_of_backbone_epoch": cache_epoch <= seconds["backbone"] / 10,
        },
    }, args.out)


if __name__ == "__main__":
    main()
