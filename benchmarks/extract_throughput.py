"""Extraction throughput per backbone, the share of wall time spent outside the forward pass, and the
CPU allocator setting of the `probe` entry point against glibc's default, side by side in one run.

    python benchmarks/extract_throughput.py                      # CPU: the bundled sample at 224
    python benchmarks/extract_throughput.py --full --data DIR    # GPU: all 60,000 JPEG CIFAR-10 images

Each run is its own process (a fresh allocator), alternating the tuned and the default malloc
(PROBE_MALLOC=default), so both see the same machine. Throughput does not depend on the weights'
values, so random init (--weights none) is used.
Targets: on a 2-core CPU, ResNet-18 at 224 spends at most 10% outside its forward pass (issue 2), and
system time is at most 10% of wall time for ResNet-18 and lite0 at 224 (issue 10); a timm ViT-S/14
(DINOv2, native 518) and an HF model (DINOv2-small's config and processor, native 224) spend at most
10% outside their forward pass (issue 9); on an H100, ResNet-18 at 224 over all 60,000 images at
20,000 images/s or more end to end.

`hf-dinov2-small` stands for facebook/dinov2-small built from its configuration with random weights
and saved with its image processor (the hub is not needed); token models run on --token-per-class
images per class and split, since a ViT at 518 px takes seconds per image on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

from probe.backbones import resolve  # noqa: E402
from probe.datasets import SAMPLE_DIR  # noqa: E402


def hf_dinov2_small(folder: Path) -> str:
    """facebook/dinov2-small's architecture and image processor (shortest side 256, crop 224, bicubic),
    random weights, saved as save_pretrained does: an hf: model without the hub."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                          patch_size=14, image_size=518, layerscale_value=1.0)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return f"hf:{folder}"

# One extraction in a fresh process, with the allocator setting the `probe` entry point applies
# unless PROBE_MALLOC=default; prints its timings as JSON.
RUN = """
import json, resource, sys, time
from probe.device import tune_cpu_allocator
from probe.extract import extract
tuned = tune_cpu_allocator()
t0 = time.perf_counter()
before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
r = extract(**json.loads(sys.argv[1]))
wall = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = lambda field: sum(getattr(a, field) - getattr(b, field) for a, b in zip(after, before))
print(json.dumps({"tuned_malloc": tuned, "images": r.images, "loop_seconds": r.seconds,
                  "forward_seconds": r.forward_seconds, "wall_seconds": wall, "user_seconds": cpu("ru_utime"),
                  "system_seconds": cpu("ru_stime"), "minor_faults": cpu("ru_minflt")}))
"""


def run(options: dict, malloc: str) -> dict:
    env = {**os.environ, "PROBE_MALLOC": malloc}
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(options)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(images_per_second=row["images"] / row["loop_seconds"],
               images_per_second_wall=row["images"] / row["wall_seconds"],
               share_outside_forward=1 - row["forward_seconds"] / row["loop_seconds"],
               system_share_of_wall=row["system_seconds"] / row["wall_seconds"])
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,efficientnet_lite0,timm:vit_small_patch14_dinov2.lvd142m,hf-dinov2-small")
    p.add_argument("--data", type=Path, default=SAMPLE_DIR, help="an image folder (train/ and test/)")
    p.add_argument("--per-class", type=int, default=None, help="images per class and split (default: all)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: each model's own)")
    p.add_argument("--token-per-class", type=int, default=10,
                   help="images per class and split for the token models (default 10; 0: as the others)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--full", action="store_true", help="GPU run: all images of --data, batch 512, tuned malloc only")
    p.add_argument("--out", default=None, help="result file (default: results/extract_throughput[_full].json)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.per_class is None else folder_subset(
            args.data, Path(tmp) / "data", {"train": args.per_class, "test": args.per_class})
        for model in args.models.split(","):
            name = hf_dinov2_small(Path(tmp) / "hf-dinov2-small") if model == "hf-dinov2-small" else model
            token = ":" in name
            folder = data if not token or not args.token_per_class or args.full else folder_subset(
                args.data, Path(tmp) / "token-data", {"train": args.token_per_class, "test": args.token_per_class})
            options = {"model": name, "weights": "none", "dataset": f"folder:{Path(folder).resolve()}",
                       "resolution": args.resolution, "cache_dir": str(Path(tmp) / "cache"), "device": args.device,
                       "force": True, "batch_size": args.batch_size or (512 if args.full else None), "progress": False}
            tuned = run(options, "tuned")
            resolution = resolve(name).preprocess.at(args.resolution).size
            row = {"model": model, "resolution": resolution, **tuned}
            if not args.full:
                default = run(options, "default")
                row["default_malloc"] = default
                row["wall_gain_over_default_malloc"] = default["wall_seconds"] / tuned["wall_seconds"]
            rows.append(row)
            print(f"{model}: {row['images_per_second']:.0f} images/s, {row['share_outside_forward']:.1%} of the loop "
                  f"outside the forward pass, system time {row['system_share_of_wall']:.1%} of wall"
                  + (f" ({row['default_malloc']['system_share_of_wall']:.1%} with the default malloc; wall "
                     f"{row['wall_gain_over_default_malloc']:.2f}x faster)" if "default_malloc" in row else ""))
    targets = {}
    for r in rows:
        if ":" in r["model"] or r["model"] == "hf-dinov2-small":
            targets[f"{r['model']}_{r['resolution']}_outside_forward_at_most_10pct"] = r["share_outside_forward"] <= 0.10
    r18 = next((r for r in rows if r["model"] == "resnet18" and r["resolution"] == 224), None)
    if r18 and not args.full:
        targets["resnet18_224_outside_forward_at_most_10pct"] = r18["share_outside_forward"] <= 0.10
        for r in rows:
            if r["resolution"] == 224 and r["model"] in ("resnet18", "efficientnet_lite0"):
                targets[f"{r['model']}_224_system_time_at_most_10pct_of_wall"] = r["system_share_of_wall"] <= 0.10
    if r18 and args.full:
        targets["resnet18_224_at_least_20000_images_per_second"] = r18["images_per_second_wall"] >= 20000
    write_result("extract_throughput", {
        "settings": {"data": str(args.data), "per_class": args.per_class, "token_per_class": args.token_per_class,
                     "weights": "none",
                     "device": args.device, "batch_size": args.batch_size, "full": args.full},
        "notes": "loop_seconds: the backbone passes with decoding, resizing and the cache shards; "
                 "wall_seconds adds the model build, the file listing and the HDF5 assembly. Each row is one "
                 "process with the entry point's malloc setting; default_malloc is the same run with "
                 "PROBE_MALLOC=default, run right after it.",
        "rows": rows, "targets_met": targets,
    }, args.out or (Path(__file__).parent / "results" / f"extract_throughput{'_full' if args.full else ''}.json"))


if __name__ == "__main__":
    main()
