"""The README's segmentation example: `probe extract --tokens`, `probe fit --head seg-linear` and
`probe predict --masks` on a folder-seg: set, the mask shown beside its image and the true mask.

    python benchmarks/seg_mask.py            # lite0's ImageNet weights (offline), the tests' synthetic scenes

The scenes (tests/layouts.py: squares of three colours on a noisy background, in the folder-seg layout)
are the only segmentation data offline: the result shows the commands' form and output, not a
benchmark of dense probing. With ADE20K under data/: --dataset ade20k.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import layouts  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from probe.segment import voc_palette  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="default")
    p.add_argument("--out", default=None, help="the JSON result (the picture beside it) [default: benchmarks/results/]")
    p.add_argument("--train", type=int, default=120)
    p.add_argument("--test", type=int, default=30)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        layouts.folder_seg(tmp / "scenes", args.train, args.test)
        common = ["--model", args.model, "--weights", args.weights, "--dataset", f"folder-seg:{tmp / 'scenes'}", "--cache-dir", str(tmp / "cache")]
        probe = [sys.executable, "-m", "probe", "-q"]
        subprocess.run([*probe, "extract", *common, "--tokens"], check=True)
        fitted = subprocess.run([*probe, "fit", *common, "--head", "seg-linear", "--out", str(tmp / "runs" / "seg")],
                                check=True, capture_output=True, text=True).stdout
        print(fitted, end="")
        run = next((tmp / "runs").iterdir())
        images = sorted((tmp / "scenes" / "test" / "images").glob("*.png"))[:3]
        subprocess.run([*probe, "predict", "--head", str(run), *map(str, images), "--masks", str(tmp / "masks")], check=True)
        import json

        metrics = json.loads((run / "metrics.json").read_text())
        palette = voc_palette()
        tiles = []
        for image in images:
            truth = Image.fromarray(np.array(Image.open(tmp / "scenes" / "test" / "masks" / image.name)), mode="P")
            truth.putpalette(palette)
            row = [Image.open(image).convert("RGB"), truth.convert("RGB"), Image.open(tmp / "masks" / image.name).convert("RGB")]
            tiles.append(np.concatenate([np.array(t.resize((144, 120), Image.NEAREST)) for t in row], 1))
        picture = (Path(args.out).parent if args.out else Path(RESULTS)) / "seg_mask.png"
        Image.fromarray(np.concatenate(tiles, 0)).save(picture)
        print(f"wrote {picture}")
    write_result("seg_mask", {
        "settings": {"model": args.model, "dataset": "folder-seg: synthetic scenes (tests/layouts.py)",
                     "train": args.train, "test": args.test, "token_shape": metrics["token_shape"]},
        "mean_iou": metrics["mean_iou"], "mean_iou_interval": metrics["intervals"]["mean_iou"],
        "pixel_accuracy": metrics["pixel_accuracy"], "per_class_iou": metrics["per_class_iou"],
        "picture": "seg_mask.png: each row an image, its true mask and probe predict's mask (VOC's colours)",
        "notes": "synthetic scenes: the commands' form, not a measure of dense probing",
    }, args.out)


if __name__ == "__main__":
    main()
