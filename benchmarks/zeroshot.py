"""Zero-shot, few-shot and the full linear probe on one chart, from one cache, by probe's own commands.

Offline there is no pretrained image-text model to download, so this runs the commands on a tiny
**random** open_clip model (built here, in open_clip's local-dir layout) over the bundled sample: the
chart shows the commands' output and its form, not a result (every line is near chance, 10%). With
network, give --model open_clip:ViT-B-32/laion2b_s34b_b79k (or any image-text model) for the real one.

    python benchmarks/zeroshot.py                 # tiny random open_clip model, bundled sample: seconds

The commands it runs (the same for a real model):

    probe extract --model M --dataset sample --pool proj
    probe curve CACHE --head zeroshot,logreg,logreg+zeroshot --shots 1,2,4,8,16,all --seeds 5
    probe retrieval CACHE
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import RESULTS, write_result  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an image-text model [default: a tiny random open_clip model built here]")
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--shots", default="1,2,4,8,16,all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", help="result JSON [default: results/zeroshot.json, the chart beside it]")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="probe-zeroshot-"))
    try:
        model = args.model
        if model is None:
            from conftest import open_clip_text_folder

            model = f"open_clip:local-dir:{open_clip_text_folder(work / 'tiny_random_open_clip')}"
        run = lambda *a: subprocess.run(["probe", "-q", *a], check=True, capture_output=True, text=True).stdout  # noqa: E731
        common = ["--cache-dir", str(work / "cache")]
        run("extract", "--model", model, "--dataset", args.dataset, "--pool", "proj", *common)
        cache = str(next((work / "cache").glob("*.h5")))
        run("curve", cache, "--head", "zeroshot,logreg,logreg+zeroshot", "--shots", args.shots, "--seeds", str(args.seeds),
            "--runs-dir", str(work / "runs"), "--out", str(work / "curve"))
        retrieval = json.loads(run("retrieval", cache, "--runs-dir", str(work / "runs"), "--json"))
        curve = json.loads((work / "curve" / "curve.json").read_text())
        out = Path(args.out) if args.out else RESULTS / "zeroshot.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "curve" / "curve.png", out.with_name(out.stem + "_curve.png"))
        result = {"model": model if args.model else "tiny random open_clip (built by this script: weights are random)",
                  "dataset": args.dataset, "random_weights": args.model is None,
                  "lines": [{"head": line["head"], "points": [{k: p[k] for k in ("shots", "mean", "std", "interval")}
                                                              for p in line["points"]]} for line in curve["lines"]],
                  "retrieval": {k: retrieval[k] for k in ("recall@1", "recall@5", "recall@10", "mAP", "intervals")},
                  }
        write_result("zeroshot", result, out)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
