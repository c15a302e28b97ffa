"""Write the benchmark results into docs/benchmarks.md, and README.md's one results table, from the JSON
files in benchmarks/results/ (never by hand).

    python benchmarks/report.py          # rewrites the parts of both files between their results markers
    python benchmarks/report.py --check  # exit 1 if either is not what the result files give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start (benchmarks/report.py writes this) -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start (benchmarks/report.py writes this) -->", "<!-- summary:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(r: dict) -> str:
    m = r["machine"]
    where = m["gpu"] if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores"
    if "probe" not in m:  # results written before benchmarks recorded probe's version
        return where + "; probe 0.2, which resized images straight to the input size, bilinear (0.3 uses the model's own resize, crop and interpolation)"
    return f"{where}; probe {m['probe']}"


def _yes(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _targets(r: dict) -> str:
    return "Targets: " + ", ".join(f"{k.replace('_', ' ')}: {_yes(v)}" for k, v in r["targets_met"].items()) + "."


def _on_gpu(r: dict) -> bool:
    return bool(r["machine"].get("gpu"))


def speedup(r: dict) -> list[str]:
    s, b, p = r["settings"], r["baseline"], r["probe"]
    fits, x = p["fits"], r["speedup"]
    gpu = _on_gpu(r)
    # Absolute times only from a GPU; on the shared CPU, each step as a share of the baseline's time.
    cost = (lambda sec: f"{sec:.1f} s") if gpu else (lambda sec: f"{sec / b['seconds']:.2%}")
    lines = [
        f"**Speedup** (`benchmarks/results/{'speedup_full' if s['full'] else 'speedup'}.json`; {_machine(r)}): "
        f"{s['model']} at {s['resolution']} px, {s['n_train']:,} training and {s['n_test']:,} test images of the "
        f"JPEG CIFAR-10, {s['epochs']} epochs for the baseline, all in one run.",
        "",
        f"| | {'wall time' if gpu else 'time, as a share of the baseline'} | test accuracy |",
        "|---|---:|---:|",
        f"| tutorials' way: backbone every epoch, Linear trained with Adam | {cost(b['seconds'])} | "
        f"{b['final_test_accuracy']:.2%} |",
        f"| probe extract (once) | {cost(p['extract_seconds'])} | |",
        f"| probe fit --head logreg (C sweep included) | {cost(fits['logreg']['seconds'])} | "
        f"{fits['logreg']['test_accuracy']:.2%} |",
        f"| probe fit --head linear | {cost(fits['linear']['seconds'])} | {fits['linear']['test_accuracy']:.2%} |",
        f"| probe fit --head logreg --C (the C the sweep chose) | {cost(fits['logreg_fixed_C']['seconds'])} | "
        f"{fits['logreg_fixed_C']['test_accuracy']:.2%} |",
        "",
        f"First experiment (extract + logreg fit): **{x['first_experiment_logreg']:.1f}x** faster "
        f"(target 10x: {_yes(r['targets_met']['first_experiment_at_least_10x'])}); every later experiment on the "
        f"same cache: **{x['later_experiment_logreg']:.0f}x** with logreg and its sweep (target 500x: "
        f"{_yes(r['targets_met']['later_experiment_at_least_500x'])}), {x['later_experiment_logreg_fixed_C']:.0f}x "
        f"with logreg at the chosen C, {x['later_experiment_linear']:.0f}x with the linear head. Accuracy, "
        f"cached logreg minus baseline: {r['accuracy_points_logreg_minus_baseline']:+.2f} points (target: "
        f"-0.5 or better: {_yes(r['targets_met']['logreg_within_0.5_points_or_better'])}). One backbone pass of "
        f"probe is {x['one_backbone_pass_baseline_epoch_over_extract']:.1f}x faster than one baseline epoch "
        "(batched resizing on the device and channels_last instead of per-image PIL transforms); the rest of the "
        "gain is from running the backbone once instead of every epoch.",
    ]
    if "later_experiment_logreg_whole_process" in x:
        sh = p["shell_seconds"]
        lines += ["", "As a user runs it from the shell, each side a fresh process with its imports (the baseline's "
                  f"`python` process, then `probe extract` and `probe fit`): first experiment "
                  f"**{x['first_experiment_logreg_whole_process']:.1f}x**, every later experiment "
                  f"**{x['later_experiment_logreg_whole_process']:.0f}x** with logreg (target 100x: "
                  f"{_yes(r['targets_met'].get('later_experiment_whole_process_at_least_100x'))}); the `probe fit` "
                  f"process took {x['fit_logreg_process_over_python_import_torch']:.2f}x the time of `python -c "
                  f"\"import torch\"` ({sh['fit_logreg']:.2f} s against {sh['python_import_torch']:.2f} s)."]
    return lines


def startup(r: dict) -> list[str]:
    helps = [row for row in r["rows"] if row["command"].endswith("--help")]
    fit = next(row for row in r["rows"] if row["command"].startswith("probe fit --head"))
    slowest = max(helps, key=lambda row: row["seconds"])
    return [
        f"**Start-up** (`benchmarks/results/startup.json`; {_machine(r)}): each command a fresh process from the "
        f"shell, alternating with `python -c \"import torch\"`, best of {r['repeats']}. The {len(helps)} `--help` "
        f"commands take at most **{slowest['over_import_torch']:.2f}x** the time of importing torch (slowest: "
        f"`{slowest['command']}`); `probe fit --head logreg` on the demo's cache, the whole process with its C sweep, "
        f"**{fit['over_import_torch']:.2f}x**. --help loads neither torch nor scikit-learn, and a logreg fit on the "
        "CPU runs on numpy and scipy's L-BFGS-B without torch.",
        "",
        _targets(r),
    ]


def precision(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"**CPU extraction past eager float32** (`benchmarks/results/precision.json`; {_machine(r)}): "
        f"{s['throughput_images']:,} JPEG CIFAR-10 images at {s['resolution']} px through each model (random init), "
        "each configuration a fresh process, alternating. Extraction: the images/s `probe extract` reports "
        "(decoding, resizing, the forward pass, the shards; a compilation included); forward: the backbone's "
        "after the first batch (with --compile, the compilation); end to end: the whole command, the model "
        "build and HDF5 assembly included. The forward "
        "pass as a share of this CPU's limit: its nominal multiply-adds per second (as a direct convolution counts "
        "them: oneDNN's convolution algorithms may do fewer, so a share can pass 100%) over a 4096 x 4096 "
        "matmul's (fp16: 1024 x 1024), in the same precision and run.",
        "",
        "| model | configuration | extraction images/s, relative to fp32 | forward pass | end to end | share of the matmul rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['config']} | **{row.get('speedup_over_fp32', float('nan')):.2f}x** | "
                     f"{row['forward_speedup_over_fp32']:.2f}x | {row['end_to_end_speedup_over_fp32']:.2f}x | "
                     f"{row['share_of_matmul_rate']:.1%} |")
    rates = r["matmul_multiply_adds_per_second"]
    lines += ["", "Matmul rate, relative to fp32: " + ", ".join(f"{k} {v / rates['fp32']:.2f}x" for k, v in rates.items())
              + ".", "", f"Accuracy of logreg on {s['accuracy_model']}'s features (real weights; "
              f"{10 * s['train_per_class']:,} training and {10 * s['test_per_class']:,} test images):", "",
              "| configuration | test accuracy | points from fp32 |", "|---|---:|---:|"]
    for a in r["accuracy"]:
        lines.append(f"| {a['config']} | {a['test_accuracy']:.2%} | {a['points_from_fp32']:+.2f} |")
    return lines + ["", _targets(r)]


def heads(r: dict) -> list[str]:
    f = r["features"]
    budget = {"logreg": 10, "linear": 5, "knn": 10}
    lines = [
        f"**Heads** (`benchmarks/results/heads.json`; {_machine(r)}): {f['n_train']:,} x {f['dim']} training "
        f"features ({f['model']} at {f['resolution']} px on the JPEG CIFAR-10"
        + (f", projected to {f['pca']} dimensions by PCA" if f.get("pca") else "") + f"), {f['n_test']:,} test. "
        "Seconds are shown only against the CPU budgets of issue 3 they are checked against (knn: fit and "
        "predicting the test split).",
        "",
        "| head | seconds / budget on this CPU | test accuracy |",
        "|---|---:|---:|",
    ]
    for row in r["rows"]:
        seconds = row["fit_seconds"] + (row["predict_seconds"] if row["head"] == "knn" else 0.0)
        spent = f"{seconds:.1f} / {budget[row['head']]}" if row["head"] in budget else "no budget"
        lines.append(f"| {row['head']} | {spent} | {row['test_accuracy']:.2%} |")
    logreg = next((row for row in r["rows"] if row["head"] == "logreg"), None)
    if logreg and "best_fixed_C_test_accuracy" in logreg:
        lines += ["", f"The sweep chose C = {logreg['C_chosen']:.3g}: {logreg['test_accuracy']:.2%}; the best "
                  f"fixed C of the grid scores {logreg['best_fixed_C_test_accuracy']:.2%} on the test split."]
    if r.get("against_scikit_learn"):
        lines += ["", "The whole logreg fit, sweep included, against one scikit-learn `LogisticRegression(lbfgs)` fit "
                  "at the C the sweep picked, same standardized features, alternating in one run (best of 3): "
                  + "; ".join(f"{v['n']:,} x {v['dim']:,}: **{v['ratio']:.2f}x** its time" for v in r["against_scikit_learn"])
                  + ". The gradient is computed in closed form (two matrix products, no autograd graph) and each C "
                  "warm-starts the next."]
    return lines + ["", _targets(r)]


def throughput(r: dict) -> list[str]:
    gpu = _on_gpu(r)
    malloc = all("default_malloc" in row for row in r["rows"])
    lines = [
        f"**Extraction** (`benchmarks/results/{'extract_throughput_full' if r['settings']['full'] else 'extract_throughput'}.json`;"
        f" {_machine(r)}; random init, throughput does not depend on the weights"
        + ("; each model run twice in a row, with the `probe` command's malloc setting and with glibc's default)"
           if malloc else ")") + ":",
        "",
        "| model | resolution | images |" + (" images/s |" if gpu else "") + " time outside the forward pass |"
        + (" system time / wall | the same, glibc's default malloc | wall time gain |" if malloc else ""),
        "|---|---:|---:|" + ("---:|" if gpu else "") + "---:|" + ("---:|---:|---:|" if malloc else ""),
    ]
    for row in r["rows"]:
        rate = f" {row['images_per_second_wall']:,.0f} |" if gpu else ""
        churn = (f" {row['system_share_of_wall']:.1%} | {row['default_malloc']['system_share_of_wall']:.1%} | "
                 f"{row['wall_gain_over_default_malloc']:.2f}x |") if malloc else ""
        lines.append(f"| {row['model']} | {row['resolution']} | {row['images']:,} |{rate} "
                     f"{row['share_outside_forward']:.1%} |{churn}")
    return lines + ["", _targets(r)]


def strategies(r: dict) -> list[str]:
    s = r["settings"]
    rows = r["rows"]
    reference = rows[0]["wall_seconds"]  # the cached logreg, extraction included
    lines = [
        f"**Strategies** (`benchmarks/results/strategies.json`; charts `strategies_accuracy.png`, "
        f"`strategies_curves.png` beside it; {_machine(r)}): {s['model']} at {s['resolution']} px, "
        f"{s['train_per_class']} training images per class, {s['n_test']:,} test images, {s['epochs']} epochs.",
        "",
        "| method | trainable parameters | test accuracy | wall time, relative to the cached logreg (extraction included) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['trainable_parameters']:,} | {row['test_accuracy']:.2%} | "
                     f"{row['wall_seconds'] / reference:.1f}x |")
    if s.get("finetune_defaults"):
        lines += ["", f"Fine-tuning: {s['finetune_defaults']}."]
    rates = {k: v for k, v in s.get("learning_rates", {}).items() if isinstance(v, dict)}
    if rates:
        lines += ["", "Learning rates picked on the validation split (below, `lr_search.json`): " + "; ".join(
            f"{k}: " + ", ".join(f"{n.replace('_', ' ')} {v:g}" for n, v in lr.items()) for k, lr in rates.items())
            + "; the others at the defaults."]
    return lines + (["", _targets(r)] if r.get("targets_met") else [])


def bn_cause(r: dict) -> list[str]:
    s = r["settings"]
    probe = r["rows"][0]["validation_accuracy"]
    lines = [
        f"**BatchNorm in fine-tuning** (`benchmarks/results/bn_cause.json`; {_machine(r)}): {s['model']} at "
        f"{s['resolution']} px, {s['n_train']:,} training images, validated on {s['n_validation']:,} held out of the "
        f"training images (never the test split), {s['epochs']} epochs; the cached logreg scores {probe:.1%} there.",
        "",
        "| run | BatchNorm | validation accuracy per epoch | final |",
        "|---|---|---|---:|",
    ]
    for row in r["rows"][1:]:
        curve = " ".join(f"{a:.1%}" for a in row["curve"])
        lines.append(f"| {row['run']} | {row['bn']} | {curve} | {row['validation_accuracy']:.1%} |")
    return lines


def views(r: dict) -> list[str]:
    s = r["settings"]
    tuned = r["rows"][-1]
    lines = [
        f"**Views** (`benchmarks/results/views.json`; {_machine(r)}): {s['model']} at {s['resolution']} px, "
        f"{s['n_train']:,} training and {s['n_test']:,} test images, `{s['augment']}` views, all in one run; each "
        "cached run's time is its first experiment (extract with its views, then fit logreg).",
        "",
        "| method | test accuracy | backbone passes | wall time, relative to finetune-linear |",
        "|---|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {row['test_accuracy']:.2%} | {row['backbone_passes']:,} | "
                     f"{row['wall_seconds'] / tuned['wall_seconds']:.2f}x |")
    closed = r["gap_closed_by_most_views"]
    lines += ["", "Share of the accuracy gap between the plain cached probe and finetune-linear that the most views "
              "close: " + ("none to close (finetune-linear is not above the plain probe)" if closed is None
                           else f"{closed:.0%}") + ". Per image, a stored view costs one backbone pass, as one "
              f"training epoch does; {s['epochs'] * s['n_test']:,} of finetune-linear's {tuned['backbone_passes']:,} "
              "passes are its evaluation of the test split after every epoch (probe finetune's default, which its "
              "learning curve needs), and most of the time ratio comes from there. The views are extracted once and "
              "reused by every later head.", "", _targets(r)]
    return lines


def fingerprint(r: dict) -> list[str]:
    s = r["settings"]
    return [
        f"**Folder fingerprint** (`benchmarks/results/fingerprint.json`; {_machine(r)}): hashing the content of all "
        f"{r['images']:,} files of the JPEG CIFAR-10 folder takes {r['fingerprint_share_of_extract']:.2%} "
        f"of the time its extraction with {s['model']} at {s['resolution']} px takes (the extraction projected from "
        f"{s['rate_images']:,} images measured in the same run); names and sizes alone took "
        f"{r['names_and_sizes_seconds'] / max(r['content_fingerprint_seconds']):.0%} of the content hash's time.",
        "",
        _targets(r),
    ]


def layers(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"**Layers** (`benchmarks/results/layers.json`, chart `layers_depth.png` beside it; {_machine(r)}): {s['model']} at "
        f"{s['resolution']} px, {s['train_per_class']} training and {s['test_per_class']} test images per class of the "
        f"JPEG CIFAR-10. `probe extract --layers all` took **{r['layers_all_over_final_only']:.2f}x** the time of the "
        "final-only extraction (best of "
        f"{s['repeats']} each, alternating). Test accuracy of logreg (C sweep) on each block's pooled output:",
        "",
        "| layer | relative depth | width | " + " | ".join({"default": "pretrained", "none": "random init"}.get(
            c["weights"], c["weights"]) for c in r["curves"]) + " |",
        "|---|---:|---:|" + "---:|" * len(r["curves"]),
    ]
    for i, point in enumerate(r["curves"][0]["points"]):
        accuracies = " | ".join(f"{c['points'][i]['test_accuracy']:.1%}" for c in r["curves"])
        lines.append(f"| {point['layer']} | {point['depth']:.2f} | {point['width']:,} | {accuracies} |")
    rises = "rises with depth" if r["pretrained_rises_with_depth"] else "does not rise steadily with depth"
    seen = []
    for c in r["curves"]:
        best = max(c["points"], key=lambda p: p["test_accuracy"])
        final = c["points"][-1]
        label = {"default": "pretrained", "none": "random init"}.get(c["weights"], c["weights"])
        seen.append(f"{label}: best {best['layer']} ({best['test_accuracy']:.1%}), final feature "
                    f"{final['test_accuracy']:.1%}")
    return lines + ["", f"The pretrained curve {rises} (no block more than 2 points below the one before it). "
                    + "; ".join(seen) + ".", "", _targets(r)]


def lr_search(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"**Learning rates of the comparison** (`benchmarks/results/lr_search.json`; {_machine(r)}): {s['model']} at "
        f"{s['resolution']} px, trained on {s['train']} ({s['n_train']:,}), validated on {s['validation']} "
        f"({s['n_validation']:,}), {s['epochs']} epochs; the strategies benchmark uses the rates picked here.",
        "",
        "| run | learning rate | validation accuracy per epoch | final |",
        "|---|---:|---|---:|",
    ]
    for row in r["rows"]:
        curve = " ".join(f"{a:.1%}" for a in row["curve"]) if row["curve"] else ""
        rate = "" if row["lr"] is None else f"{row['lr']:g}" + (f" (head {row['head_lr']:g})" if row.get("head_lr") else "")
        lines.append(f"| {row['run']} | {rate} | {curve} | {row['validation_accuracy']:.1%} |")
    picks = ", ".join(f"{k} {v:g}" for k, v in r["picked_lr"].items())
    return lines + ["", f"Picked (best final validation accuracy): {picks}."]


def suite(r: dict) -> list[str]:
    s = r["settings"]
    first = r["runs"][0]["seconds"]
    lines = [
        f"**Suite** (`benchmarks/results/suite.json`; {_machine(r)}): `probe suite` with {s['model']} at "
        + (f"{s['resolution']} px" if isinstance(s["resolution"], int) else "its own resolution")
        + f" over {', '.join(f'`{d}`' for d in s['datasets'])} ({s['fixtures']}), three runs in one "
        "process, each as a share of the first:",
        "",
        "| run | pairs fitted | pairs reused | time, as a share of the first run |",
        "|---|---:|---:|---:|",
    ]
    for run in r["runs"]:
        lines.append(f"| {run['run']} | {run['pairs']['done']} | {run['pairs']['reused']} | {run['seconds'] / first:.2%} |")
    cells = r["accuracy"]
    columns = list(next(iter(cells.values())))
    lines += ["", "| head | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row, values in cells.items():
        lines.append(f"| {row} | " + " | ".join("-" if v is None or isinstance(v, str) else f"{v:.1%}" for v in values.values()) + " |")
    return lines + ["", _targets(r)]


def scale(r: dict) -> list[str]:
    s, lines = r["settings"], []
    if "heads" in r:
        h = r["heads"]
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        lines += [
            f"**Heads beyond memory** (`benchmarks/results/scale.json`; {_machine(r)}): synthetic features of "
            f"ImageNet-1k's size, {s['rows']:,} x {s['dim']} float16 ({gib(h['cache_bytes'])} on disk), {s['classes']} "
            f"Gaussian classes, 50,000 test rows; logreg with its C sweep, each fit in a fresh process.",
            "",
            "| fit | training rows | read | peak RSS | C sweep points | test accuracy |",
            "|---|---:|---|---:|---:|---:|",
            f"| `--max-memory {s['max_memory']}` | {h['capped']['rows']:,} | a chunk at a time | "
            f"{gib(h['capped']['peak_rss_bytes'])} | {h['capped']['sweep_points']} | {h['capped']['test_accuracy']:.2%} |",
            f"| no cap, `--train-per-class {s['subset_per_class']}` | {h['in_memory_subset']['rows']:,} | in memory | "
            f"{gib(h['in_memory_subset']['peak_rss_bytes'])} | {h['in_memory_subset']['sweep_points']} | "
            f"{h['in_memory_subset']['test_accuracy']:.2%} |",
            "",
            f"Time per training row, capped over in memory: **{h['time_per_row_capped_over_in_memory']:.2f}x**.",
            "",
        ]
    if "assembly" in r:
        a = r["assembly"]
        lines += [f"Assembling that cache from its shards into the one HDF5 file (what rank 0 does after a "
                  f"distributed extraction) took **{a['over_a_plain_copy']:.2f}x** the time of a plain copy of the "
                  "same shards: a virtual data set over per-rank files would save about one copy of the cache, "
                  "once, and cost every later read an indirection.", ""]
    if "extraction" not in r:
        return lines + [_targets(r)]
    e = r["extraction"]
    rates = " | ".join(f"{x['ranks']} rank(s): " + (f"{x['images_per_second']:.0f} images/s" if _on_gpu(r) else
                                                    f"{e['speedup'][str(x['ranks'])]:.2f}x") for x in e["rates"])
    lines += [f"**Extraction over ranks** (`benchmarks/results/scale.json`; {_machine(r)}): `torchrun --nproc-per-node "
              f"N -m probe extract`, ResNet-18 at {s['resolution']} px, {e['rates'][0]['images']:,} images, one thread "
              f"per rank; images/s relative to one rank: {rates}.", "", _targets(r)]
    return lines


def wds_reader(r: dict) -> list[str]:
    s = r["settings"]
    return [
        f"**WebDataset reader** (`benchmarks/results/wds_reader.json`; {_machine(r)}): {s['images']:,} JPEG CIFAR-10 "
        f"images in {s['shards']} tar shards written by webdataset's TarWriter, each decoded to a uint8 array in one "
        f"process, alternating, best of {s['repeats']}: probe's indexed reader runs at "
        f"**{r['probe_over_webdataset']:.2f}x** the images/s of `webdataset.WebDataset(...).decode(\"rgb8\")`; its "
        f"one pass over the tar headers took {r['index_seconds'] / (s['images'] / r['images_per_second']['probe']):.0%} "
        "of one full read.",
        "",
        _targets(r),
    ]


def export(r: dict) -> list[str]:
    s, ips, fwd = r["settings"], r["images_per_second"], r["forward_images_per_second"]
    return [
        f"**Export** (`benchmarks/results/export.json`; {_machine(r)}): {s['model']} at {s['resolution']} px with a "
        f"logreg head, {s['images']} sample test images, decoding and resizing included, alternating, best of "
        f"{s['repeats']}: `probe predict --head` {ips['probe predict --head']:.0f} images/s, `--model-file` ONNX "
        f"(onnxruntime {s['onnxruntime']}) {ips['--model-file (onnxruntime)']:.0f}/s (**{r['onnx_over_probe_predict']:.2f}x**), "
        f"TorchScript {ips['--model-file (torchscript)']:.0f}/s. The forward pass alone on 64 images: eager torch "
        f"{fwd['eager torch']:.0f}/s, onnxruntime {fwd['onnxruntime']:.0f}/s, TorchScript {fwd['torchscript']:.0f}/s; "
        f"the largest probability difference between the ONNX file and torch on that batch: "
        f"{r['largest_probability_gap_onnx_vs_torch']:.1e}.",
    ]


def tokens(r: dict) -> list[str]:
    s, e = r["settings"], r["epoch_seconds"]
    G, _, C = s["token_shape"]
    acc = {row["head"]: row for row in r["rows"]}

    def cell(row):
        lo, hi = row["interval"]
        return f"{100 * row['test_accuracy']:.2f}% (95% interval {100 * lo:.2f} to {100 * hi:.2f})"
    return [
        f"**Token caches** (`benchmarks/results/tokens.json`; {_machine(r)}): {s['model']} at {s['resolution']} px, "
        f"token maps {G}x{G}x{C} {s['token_dtype']} ({r['cache_bytes'] / 2**30:.2f} GiB for {s['n_train']} training and "
        f"{s['n_test']} test images, extracted once in {r['extract_seconds']:.0f} s).",
        "",
        "| head | on | test accuracy | fit |",
        "|---|---|---:|---:|",
        *(f"| {h} | {acc[h]['on']} | {cell(acc[h])} | {acc[h]['fit_seconds']:.0f} s |" for h in ("logreg", "attentive")),
        "",
        f"One training epoch of the same attentive head over the {s['n_train']} images: {e['from_the_token_cache']:.1f} s "
        f"from the token cache, {e['running_the_backbone']:.1f} s running the backbone (decoding and resizing "
        f"included): **{100 * r['epoch_cost_ratio']:.1f}%**. {_targets(r)}",
    ]


def seg_mask(r: dict) -> list[str]:
    lo, hi = r["mean_iou_interval"]
    return [
        f"**Segmentation example** (`benchmarks/results/seg_mask.json`, seg_mask.png; {_machine(r)}): seg-linear on "
        f"{r['settings']['model']}'s {r['settings']['token_shape'][0]}x{r['settings']['token_shape'][1]} token maps of "
        f"{r['settings']['train']} synthetic training scenes, {r['settings']['test']} test: mIoU {100 * r['mean_iou']:.1f}% "
        f"({100 * lo:.1f} to {100 * hi:.1f}), pixel accuracy {100 * r['pixel_accuracy']:.1f}%. The commands' form on the "
        "only segmentation data offline, not a measure of dense probing.",
    ]


def finetune_memory(r: dict) -> list[str]:
    before = _load("finetune_memory_before")
    cells = lambda res: ", ".join(f"{row['train_images']:,} training images {row['peak_rss_bytes'] / 2**20:.0f} MiB"  # noqa: E731
                                  for row in res["rows"])
    s = r["settings"]
    lines = [f"**Fine-tuning memory** (`benchmarks/results/finetune_memory.json`; {_machine(r)}): peak RSS of "
             f"`probe finetune --strategy {s['strategy']} --epochs {s['epochs']}` ({s['model']} at {s['resolution']} px, "
             f"the JPEG CIFAR-10), each run its own process: {cells(r)}, a ratio of "
             f"**{r['peak_ratio_largest_over_smallest']:.3f}**. {_targets(r)}"]
    if before is not None:
        lines.append(f"The same script on the code before (finetune_memory_before.json, {before['code']}): {cells(before)}, "
                     f"a ratio of {before['peak_ratio_largest_over_smallest']:.3f}.")
    return lines


def render() -> str:
    parts = []
    for name, fn in (("speedup", speedup), ("speedup_full", speedup), ("heads", heads),
                     ("extract_throughput", throughput), ("extract_throughput_full", throughput),
                     ("strategies", strategies), ("lr_search", lr_search), ("bn_cause", bn_cause), ("views", views),
                     ("layers", layers), ("fingerprint", fingerprint), ("suite", suite), ("scale", scale),
                     ("wds_reader", wds_reader), ("startup", startup), ("precision", precision), ("curve", curve),
                     ("protocol", protocol), ("export", export), ("tokens", tokens), ("seg_mask", seg_mask),
                     ("finetune_memory", finetune_memory)):
        r = _load(name)
        if r is not None:
            parts.append("\n".join(fn(r)))
    return "\n\n".join(parts) if parts else "No benchmark results yet."


def curve(r: dict) -> list[str]:
    s = r["settings"]
    line = r["curve"]["lines"][0]
    cells = " | ".join(f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}" for p in line["points"])
    heads = " | ".join(f"{p['shots']}" for p in line["points"])
    lines = [
        f"**Few-shot curve** (`benchmarks/results/curve.json`; {_machine(r)}): `probe curve` for logreg on "
        f"{line['model']}'s cache of the JPEG CIFAR-10 ({Path(s['features'][0]).name.split('__r')[1].split('__')[0]} px), "
        f"{r['curve_fits']} fits (k per class x {s['seeds']} seeds, and all once), each with its predictions and "
        f"intervals: **{r['curve_over_one_fit']:.2f}x** the time of one `probe fit --head logreg` on all "
        "training images, in one run.",
        "",
        f"| images per class | {heads} |", "|---" + "|---:" * len(line["points"]) + "|",
        f"| test accuracy (%), mean ± sd over seeds | {cells} |",
        "",
        "logreg's C where an episode is too small for a 20% validation split, on validation images of the "
        f"training split (the first {s['pool']:,} of each class hold the episodes, the next {s['validation']:,} "
        "are scored; never the test split), mean over seeds:",
        "",
        "| features | k | probe's rule | validation accuracy | scikit-learn's C = 1 | best fixed C in hindsight |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for e in r["evidence"]:
        name = Path(e["features"]).name
        feature = f"{name.split('__')[1]} {name.split('__r')[1].split('__')[0]} px"
        for x in e["summary"]:
            lines.append(f"| {feature} | {x['k']} | {x['rule_search']} | {x['rule']:.2%} | {x['sklearn_default_C1']:.2%} | "
                         f"{x['best_fixed']:.2%} (C = {x['best_fixed_C_in_hindsight']:.3g}) |")
    return lines + ["", _targets(r)]


def _with_seeds(text: str, ref: dict, s: dict) -> str:
    return text + (f" ({ref['n']} seed{'s' if ref['n'] > 1 else ''})" if ref["n"] != s["seeds"] else "")


def protocol(r: dict) -> list[str]:
    def combo(c):
        return f"{c['normalize']} / {c['search']} / {c['validation']} / {'refit' if c['refit'] else 'no refit'}"

    def mean_sd(x):
        return f"{100 * x['mean']:.2f} ± {100 * x['sd']:.2f}" if x.get("sd") is not None else f"{100 * x['mean']:.2f}"
    sets = r["sets"]
    lines = [
        f"**The logreg protocol** (`benchmarks/results/protocol.json`; {_machine(r)}): test accuracy (%), mean ± sd "
        "over seeds (a seed draws the training subset and the validation split), on "
        f"{len(sets)} feature sets; `probe fit` (its default: `--normalize {r['default']} --validation "
        f"{r.get('default_validation', 'split')}`, the C grid, refit) beside the "
        "CLIP paper's protocol run by scikit-learn (raw features, C by bisection over 1e-6..1e6, refit) and "
        "CLIP_benchmark's own linear probe (L2-normalized features, AdamW; with its weight-decay search, and "
        "without). Wall: seconds per fit." + ("" if r.get("complete", True) else " (partial: not every set has run)"),
        "",
        "| set | train x dim | seeds | probe fit | wall | best combination | CLIP paper (scikit-learn) | wall | "
        "CLIP_benchmark search | CLIP_benchmark default |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for s in sets:
        d, refs = s.get("probe_default") or s["probe_fit"][r["default"]], s["references"]
        best = max(s["combinations"], key=lambda c: c["mean"])
        sk = refs.get("clip_paper_sklearn")
        cb, cd = refs.get("clip_benchmark_search"), refs.get("clip_benchmark_default")
        lines.append(
            f"| {s['name']} | {s['n_train']:,} x {s['dim']} | {s['seeds']} | {mean_sd(d)} | {d['wall_seconds']:.2f} | "
            f"{combo(best)}: {100 * best['mean']:.2f} | "
            + (f"{_with_seeds(mean_sd(sk), sk, s)} | {sk['wall_seconds']:.1f}" if sk else "not run | ")
            + f" | {_with_seeds(mean_sd(cb), cb, s) if cb else '-'} | {_with_seeds(mean_sd(cd), cd, s) if cd else '-'} |")
    rankings = [("every set", r["ranking"])]
    if r.get("ranking_kfold_sets"):
        rankings.append((f"the sets with k-fold runs ({', '.join(r['kfold_sets'])})", r["ranking_kfold_sets"]))
    for over, ranked in rankings:
        lines += ["", f"Combinations ranked by their mean gap to the best combination of each set, over {over} "
                  "(points; the first 10 and probe's default; `auto`: k-fold up to 5,000 training "
                  "images, the split beyond):", "",
                  "| normalize / search / validation / refit | mean gap | worst gap |", "|---|---:|---:|"]
        default = (r["default"], "grid", r.get("default_validation", "split"), True)
        for i, c in enumerate(ranked):
            if i < 10 or (c["normalize"], c["search"], c["validation"], c["refit"]) == default:
                lines.append(f"| {i + 1}. {combo(c)} | {100 * c['mean_gap_to_best']:.2f} | "
                             f"{100 * c['worst_gap_to_best']:.2f} |")
    lines += ["", "probe fit's default against the best reference of each set: "
              + "; ".join(f"{c['set']} {100 * c['gap']:+.2f} points"
                          + (f" at {c['wall_ratio_to_clip_paper']:.3f}x the CLIP paper protocol's wall" if
                             c["wall_ratio_to_clip_paper"] is not None else "") for c in r["checks"]) + ".",
              "", _targets(r)]
    return lines


def summary() -> str:
    """README's one table: the headline figures, each from its result file."""
    rows = ["| what | measured | target |", "|---|---:|---:|"]
    r = _load("speedup")
    if r is not None:
        x = r["speedup"]
        rows.append(f"| first experiment, extract + logreg, against the tutorials' 10 epochs | "
                    f"{x['first_experiment_logreg']:.1f}x faster | 10x |")
        if "later_experiment_logreg_whole_process" in x:
            rows.append(f"| every later experiment (a new head on the cache), as a user runs it from the shell | "
                        f"{x['later_experiment_logreg_whole_process']:.0f}x faster | 100x |")
        rows.append(f"| cached logreg's test accuracy minus the tutorials' | "
                    f"{r['accuracy_points_logreg_minus_baseline']:+.2f} points | -0.5 or better |")
    r = _load("startup")
    if r is not None:
        fit = next(row for row in r["rows"] if row["command"].startswith("probe fit --head"))
        rows.append(f"| `probe fit --head logreg` on the demo's cache, whole process, over `import torch` | "
                    f"{fit['over_import_torch']:.2f}x | 1.5x |")
    r = _load("strategies")
    if r is not None:
        acc = {row["method"]: row["test_accuracy"] for row in r["rows"]}
        rows.append(f"| full fine-tuning minus the cached logreg, test accuracy (3,000 images) | "
                    f"{100 * (acc['finetune-full'] - acc['logreg']):+.1f} points | +1 |")
    r = _load("export")
    if r is not None:
        rows.append(f"| an exported ONNX file (onnxruntime) over `probe predict --head`, images/s on the CPU | "
                    f"{r['onnx_over_probe_predict']:.1f}x | none set |")
    r = _load("tokens")
    if r is not None:
        rows.append(f"| an attentive-probe epoch on cached tokens, as a share of one that runs the backbone | "
                    f"{100 * r['epoch_cost_ratio']:.1f}% | 10% or less |")
    return "\n".join(rows) + "\n\nEvery figure with its machine and the rest: [docs/benchmarks.md](docs/benchmarks.md)."


def _replace(text: str, start: str, end: str, body: str) -> str | None:
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    stale = []
    for path, start, end, body in ((args.docs, START, END, render()), (args.readme, SUMMARY_START, SUMMARY_END, summary())):
        text = path.read_text()
        new = _replace(text, start, end, body)
        if new is None:
            print(f"{path} has no results markers", file=sys.stderr)
            return 1
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
                print(f"wrote the results of {path}")
    if args.check and stale:
        print(f"{', '.join(map(str, stale))}: not what benchmarks/results/ gives: run python benchmarks/report.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
