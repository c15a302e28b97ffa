"""CPU extraction past eager float32 (issue 22): images/s of bf16 and fp16 autocast and of torch.compile
against eager float32, the logreg accuracy on the features of each, and the forward pass as a share of
the machine's limit (multiply-adds per second against a large matmul's, per precision), in one run.

    python benchmarks/precision.py --data /tmp/cifar10-jpeg

Throughput: each configuration is one fresh process extracting the same images (random init:
throughput does not depend on the weights), alternating configurations. Three rates: the forward pass
after the first batch (with --compile, the compilation); the extraction's own images/s, as `probe
extract` reports it (decode, resize, forward, shards; a compilation included), which the target is
on; and end to end (the model build, the file listing and the HDF5 assembly too).
Accuracy: efficientnet_lite0 with its real weights on a 5,000 / 1,000 subset of the JPEG CIFAR-10 at
224, features of each precision fitted by the same logreg (its C sweep).
Target: at least 1.5x eager float32's images/s for resnet18 and efficientnet_lite0 at 224, at an
accuracy within 0.3 points of float32's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import folder_subset, write_result  # noqa: E402

CONFIGS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp16": ("fp16", False),
           "fp32+compile": ("fp32", True), "bf16+compile": ("bf16", True)}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# One extraction in a fresh process, as the `probe` command runs it (its malloc setting); prints JSON.
RUN = """
import json, sys, time
from probe.device import tune_cpu_allocator
from probe.extract import extract
tune_cpu_allocator()
t0 = time.perf_counter()
r = extract(**json.loads(sys.argv[1]))
print(json.dumps({"images": r.images, "loop_seconds": r.seconds, "forward_seconds": r.forward_seconds,
                  "first_forward_seconds": r.first_forward_seconds, "wall_seconds": time.perf_counter() - t0,
                  "path": str(r.path)}))
"""


IN_PROCESS = []  # --in-process: a quick check of this script, not a measurement


def extract_in_a_process(options: dict) -> dict:
    if IN_PROCESS:
        from probe.extract import extract

        t0 = time.perf_counter()
        r = extract(**options)
        return {"images": r.images, "loop_seconds": r.seconds, "forward_seconds": r.forward_seconds,
                "first_forward_seconds": r.first_forward_seconds, "wall_seconds": time.perf_counter() - t0,
                "path": str(r.path)}
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(options)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def multiply_adds(model: str, resolution: int) -> int:
    """Multiply-adds of one image's forward pass (torch's FLOP counter, halved)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from probe.backbones import create_backbone

    net = create_backbone(model, "none", resolution)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() // 2


def matmul_rate(precision: str, n: int = 4096, repeats: int = 3) -> float:
    """Multiply-adds per second of an n x n matmul in `precision` on this CPU (best of `repeats`; fp16,
    which CPUs without AVX-512 FP16 run far slower, at n / 4)."""
    n = n // 4 if precision == "fp16" else n
    import torch

    a = torch.randn(n, n).to(getattr(torch, DTYPES[precision]))
    b = torch.randn(n, n).to(a.dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return n ** 3 / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder, e.g. the JPEG CIFAR-10")
    p.add_argument("--models", default="resnet18,efficientnet_lite0")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--throughput-per-class", type=int, default=50, help="images per class and split (throughput)")
    p.add_argument("--accuracy-model", default="efficientnet_lite0")
    p.add_argument("--accuracy-configs", default="fp32,bf16,bf16+compile")
    p.add_argument("--accuracy-weights", default="default", help="the accuracy model's weights (default: pretrained)")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--matmul-size", type=int, default=4096,
                   help="n of the n x n matmul that measures the CPU's rate (a CPU without bf16 hardware takes "
                        "minutes at 4096)")
    p.add_argument("--in-process", action="store_true", help="no fresh processes: a check of the script, not a measurement")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    IN_PROCESS[:] = [True] if args.in_process else []
    configs = args.configs.split(",")
    rows, accuracy = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = folder_subset(args.data, tmp / "throughput", {"train": args.throughput_per_class,
                                                              "test": args.throughput_per_class})
        rates = {prec: matmul_rate(prec, args.matmul_size) for prec in ("fp32", "bf16", "fp16")
                 if any(CONFIGS[c][0] == prec for c in configs)}
        for model in args.models.split(","):
            macs = multiply_adds(model, args.resolution)
            for config in configs:
                precision, compiled = CONFIGS[config]
                r = extract_in_a_process({"model": model, "weights": "none", "dataset": f"folder:{data}",
                                          "resolution": args.resolution, "precision": precision, "compile": compiled,
                                          "cache_dir": str(tmp / "cache"), "force": True, "progress": False})
                batch = 64  # the first batch, which holds the compilation, is left out where there is more
                steady = ((r["images"] - batch) / (r["forward_seconds"] - r["first_forward_seconds"])
                          if r["images"] > batch else r["images"] / r["forward_seconds"])
                rows.append({"model": model, "config": config, "precision": precision, "compile": compiled,
                             "resolution": args.resolution, **r, "images_per_second_end_to_end": r["images"] / r["wall_seconds"],
                             "images_per_second": r["images"] / r["loop_seconds"],
                             "forward_images_per_second": steady, "multiply_adds_per_image": macs,
                             "share_of_matmul_rate": macs * steady / rates[precision]})
                print(f"{model} {config}: forward {steady:.1f} images/s, extraction {rows[-1]['images_per_second']:.1f}/s, "
                      f"end to end "
                      f"{rows[-1]['images_per_second_end_to_end']:.1f}/s, {rows[-1]['share_of_matmul_rate']:.1%} of "
                      f"the {precision} matmul rate")
        fp32 = {r["model"]: r for r in rows if r["config"] == "fp32"}
        for r in rows:
            r["forward_speedup_over_fp32"] = r["forward_images_per_second"] / fp32[r["model"]]["forward_images_per_second"]
            r["end_to_end_speedup_over_fp32"] = fp32[r["model"]]["wall_seconds"] / r["wall_seconds"]
            r["speedup_over_fp32"] = r["images_per_second"] / fp32[r["model"]]["images_per_second"]

        subset = folder_subset(args.data, tmp / "accuracy", {"train": args.train_per_class, "test": args.test_per_class})
        from probe.fit import fit

        for config in args.accuracy_configs.split(","):
            precision, compiled = CONFIGS[config]
            r = extract_in_a_process({"model": args.accuracy_model, "weights": args.accuracy_weights, "dataset": f"folder:{subset}",
                                      "resolution": args.resolution, "precision": precision, "compile": compiled,
                                      "cache_dir": str(tmp / "accuracy-cache"), "progress": False})
            m = fit(features=r["path"], head="logreg", out=str(tmp / f"fit-{config}"), device="cpu").metrics
            accuracy.append({"config": config, "test_accuracy": m["test_accuracy"], "C_chosen": m["hyperparameters"]["C_chosen"],
                             "extract_wall_seconds": r["wall_seconds"]})
            print(f"accuracy {config}: {m['test_accuracy']:.4f}")
    base = next(a["test_accuracy"] for a in accuracy if a["config"] == "fp32")
    for a in accuracy:
        a["points_from_fp32"] = 100 * (a["test_accuracy"] - base)
    targets = {}
    for model in args.models.split(","):
        # The extraction's own images/s (what `probe extract` prints: decoding, resizing, the forward pass and
        # the shards; a compilation included), not the model build and file assembly around it.
        best = max((r for r in rows if r["model"] == model and r["config"] != "fp32"), key=lambda r: r["speedup_over_fp32"])
        close = next((a for a in accuracy if a["config"] == best["config"]), None)
        targets[f"{model}_{args.resolution}_at_least_1.5x_fp32"] = best["speedup_over_fp32"] >= 1.5
        if close is not None and model == args.accuracy_model:  # an accuracy loss of at most 0.3 points
            targets[f"{model}_{best['config']}_at_most_0.3_points_below_fp32"] = close["points_from_fp32"] >= -0.3
    write_result("precision", {
        "settings": {"data": str(args.data), "models": args.models, "resolution": args.resolution,
                     "in_process": args.in_process,
                     "throughput_images": 2 * 10 * args.throughput_per_class, "batch_size": 64,
                     "accuracy_model": args.accuracy_model, "train_per_class": args.train_per_class,
                     "test_per_class": args.test_per_class},
        "matmul_multiply_adds_per_second": rates, "rows": rows, "accuracy": accuracy, "targets_met": targets,
    }, args.out)


if __name__ == "__main__":
    main()
