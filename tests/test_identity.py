"""One identity for every artifact (issue 21): every option of extract, fit and finetune either changes the
identity the artifact records or is listed here as changing no number, with the reason. An option added
later without joining the identity fails here."""

from __future__ import annotations

import json
import re
import tarfile
import io
from pathlib import Path

import numpy as np
import pytest

import layouts
from conftest import copy_sample, open_clip_text_folder
from probe import cli, identity
from probe.cache import cache_path
from probe.errors import ProbeError
from probe.extract import extract
from probe.fit import fit

# Options that change no number of what they make, and why. Everything else must be in VARIANTS.
NEUTRAL = {
    "extract": {
        "data_dir": "where named data sets are read: the data's content fingerprint is in the key",
        "cache_dir": "where the file goes, not what it holds",
        "device": "where it runs: the arithmetic it runs in (precision) is in the key",
        "batch_size": "features do not depend on the batch (test_extract checks it bit for bit)",
        "num_workers": "more decoding processes give the same pixels",
        "force": "the same key, extracted again",
    },
    "fit": {
        "data_dir": "where named data sets are read: the data's content fingerprint is in the cache key",
        "cache_dir": "where caches are looked for: the cache found is in the identity by its whole key",
        "out": "where the run goes, not what it holds",
        "device": "float32 on either device; the features' arithmetic is in the cache key",
        "as_json": "how the result is printed",
        "max_memory": "changes no number unless it makes the fit stream; then `streamed` (and a linear or mlp "
                      "head's budget) join the identity (test_streaming checks that case)",
    },
    "finetune": {
        "data_dir": "where named data sets are read: the data's content fingerprint is in the identity",
        "device": "where it runs: the arithmetic (float16 autocast on CUDA) is in the identity as precision",
        "out": "where the run goes, not what it holds",
        "resume": "a resumed run is the same run",
        "as_json": "how the result is printed",
        "ignore_index": "finetune refuses segmentation sets, the only data sets that read it",
    },
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small data sets of every source, a weights file, a fitted head: what the variants below need."""
    root = tmp_path_factory.mktemp("identity")
    a = copy_sample(root / "a", per_class=3, test_per_class=1, classes=["cat", "dog", "frog"])
    b = copy_sample(root / "b", per_class=4, test_per_class=1, classes=["cat", "dog", "frog"])
    train_only = copy_sample(root / "train-only", per_class=5, classes=["cat", "dog"])
    larger = copy_sample(root / "larger", per_class=10, test_per_class=1, classes=["cat", "dog"])
    weights = root / "weights.pt"
    weights.write_bytes(b"any bytes: the weights' identity is their hash")
    hf = _hf_folder(root / "hf")
    wds = _wds_shards(root / "wds")
    cache_dir = root / "cache"
    base = dict(model="resnet18", weights="none", resolution=32, cache_dir=str(cache_dir), progress=False)
    extract(dataset=f"folder:{a}", **base)
    extract(dataset=f"folder:{a}", layers="all", **base)
    extract(dataset=f"folder:{train_only}", **base)
    extract(dataset=f"folder:{larger}", **base)
    seg = root / "seg"
    layouts.folder_seg(seg, 4, 2, ignore=None)  # every value a class: any --ignore-index of them is valid
    for ignore in (255, 0):  # the seg-linear fits of --ignore-index below
        extract(dataset=f"folder-seg:{seg}", tokens=True, data_options={"ignore_index": ignore}, **base)
    layouts.imagenet(root, n_train=2, n_val=1)  # --eval's ImageNet head and a shift set
    layouts.imagenet_shifts(root, n=1)
    for name in ("imagenet", "imagenet_r"):
        extract(dataset=name, data_dir=str(root), **base)
    clip = open_clip_text_folder(root / "open_clip")
    extract(dataset=f"folder:{a}", **{**base, "model": f"open_clip:local-dir:{clip}", "pool": "proj", "weights": "default"})
    (root / "names.txt").write_text("a cat\na dog\na frog\n")
    (root / "templates.txt").write_text("a photo of {c}.\n")
    head = fit(model="resnet18", weights="none", resolution=32, dataset=f"folder:{a}", cache_dir=str(cache_dir),
               C=1.0, out=str(root / "head")).out
    other_head = fit(model="resnet18", weights="none", resolution=32, dataset=f"folder:{a}", cache_dir=str(cache_dir),
                     C=0.1, out=str(root / "head2")).out
    return dict(seg=seg, a=a, b=b, train_only=train_only, larger=larger, weights=weights, hf=hf, wds=wds, cache_dir=cache_dir, head=head,
                other_head=other_head, clip=clip, root=root)


def _hf_folder(folder: Path) -> Path:
    """A save_to_disk data set with two image columns and two label columns."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))  # noqa: E731
    features = datasets.Features({"img": datasets.Image(), "img2": datasets.Image(),
                                  "fine": datasets.ClassLabel(names=["a", "b"]),
                                  "coarse": datasets.ClassLabel(names=["x", "y"])})
    rows = lambda n: {"img": [image() for _ in range(n)], "img2": [image() for _ in range(n)],  # noqa: E731
                      "fine": [i % 2 for i in range(n)], "coarse": [(i // 2) % 2 for i in range(n)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(6), features=features),
                          "test": datasets.Dataset.from_dict(rows(4), features=features)}).save_to_disk(str(folder))
    return folder


def _wds_shards(folder: Path) -> Path:
    """Two training shards and two test shards of four samples each, and two class-name files."""
    from probe.datasets import SAMPLE_DIR

    folder.mkdir(parents=True)
    files = sorted((SAMPLE_DIR / "train" / "cat").glob("*.jpg"))[:16]
    for i, name in enumerate(["train-0", "train-1", "test-0", "test-1"]):
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for j, f in enumerate(files[4 * i:4 * i + 4]):
                for suffix, data in ((".jpg", f.read_bytes()), (".cls", str(j % 2).encode())):
                    info = tarfile.TarInfo(f"{name}-{j}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "names1.json").write_text(json.dumps(["p", "q"]))
    (folder / "names2.json").write_text(json.dumps(["r", "s"]))
    return folder


def variants(w) -> dict[str, dict[str, tuple[list, list]]]:
    """For each option of each command: two command lines that differ in it (and in nothing else)."""
    tiny = ["--weights", "none", "--resolution", "32"]
    a, b, hf, wds = f"folder:{w['a']}", f"folder:{w['b']}", f"hf:{w['hf']}", f"wds:{w['wds']}/train-0.tar"
    seg = f"folder-seg:{w['seg']}"
    cache_opts = ["--cache-dir", str(w["cache_dir"])]
    ex = ["--model", "resnet18", "--dataset", a, *tiny]
    extract = {
        "model": (ex, [*ex, "--model", "resnet50"]),
        "dataset": (ex, [*ex, "--dataset", b]),
        "weights": (ex, [*ex, "--weights", str(w["weights"])]),
        "resolution": (ex, [*ex, "--resolution", "40"]),
        "pool": ([*ex, "--model", "timm:test_vit", "--pool", "head"], [*ex, "--model", "timm:test_vit", "--pool", "cls"]),
        "dtype": (ex, [*ex, "--dtype", "float16"]),
        "precision": (ex, [*ex, "--precision", "bf16"]),
        "compile": (ex, [*ex, "--compile"]),
        "views": (ex, [*ex, "--views", "1"]),
        "augment": ([*ex, "--views", "1"], [*ex, "--views", "1", "--augment", "crop"]),
        "layers": (ex, [*ex, "--layers", "all"]),
        "tokens": (ex, [*ex, "--tokens"]),
        "token_grid": ([*ex, "--tokens"], [*ex, "--tokens", "--token-grid", "1"]),
        "token_dtype": ([*ex, "--tokens"], [*ex, "--tokens", "--token-dtype", "float32"]),
        "ignore_index": ([*ex, "--dataset", seg, "--tokens"], [*ex, "--dataset", seg, "--tokens", "--ignore-index", "0"]),
        "image_column": ([*ex, "--dataset", hf, "--image-column", "img"], [*ex, "--dataset", hf, "--image-column", "img2"]),
        "label_column": ([*ex, "--dataset", hf, "--label-column", "fine"],
                         [*ex, "--dataset", hf, "--label-column", "coarse"]),
        "test_shards": ([*ex, "--dataset", wds, "--test-shards", f"{w['wds']}/test-0.tar"],
                        [*ex, "--dataset", wds, "--test-shards", f"{w['wds']}/test-1.tar"]),
        "class_names": ([*ex, "--dataset", wds, "--class-names", f"{w['wds']}/names1.json"],
                        [*ex, "--dataset", wds, "--class-names", f"{w['wds']}/names2.json"]),
    }
    fit = {name: ([*cache_opts, *x], [*cache_opts, *y]) for name, (x, y) in extract.items()
           if name not in ("layers", "tokens", "token_grid", "token_dtype")}
    segment = [*cache_opts, "--model", "resnet18", "--dataset", seg, *tiny, "--head", "seg-linear"]
    fit["ignore_index"] = (segment, [*segment, "--ignore-index", "0"])
    inet = [*cache_opts, "--model", "resnet18", "--dataset", "imagenet", "--data-dir", str(w["root"]), *tiny]
    fit["evaluate"] = (inet, [*inet, "--eval", "imagenet_r"])
    f = [*ex, *cache_opts]
    held = ["--model", "resnet18", "--dataset", f"folder:{w['train_only']}", *tiny, *cache_opts]
    zs = ["--model", f"open_clip:local-dir:{w['clip']}", "--pool", "proj", "--dataset", a, "--resolution", "32",
          *cache_opts, "--head", "zeroshot"]
    fit.update({
        "head": (f, [*f, "--head", "linear"]),
        "features": (f, ["--features", str(next(Path(w["cache_dir"]).glob("folder-train-only*.h5")))]),
        "classes": (f, [*f, "--classes", "cat,dog"]),
        "train_per_class": (f, [*f, "--train-per-class", "2"]),
        "seed": (f, [*f, "--seed", "1"]),
        "C": (f, [*f, "--C", "0.5"]),
        "k": ([*f, "--head", "knn", "--k", "3"], [*f, "--head", "knn", "--k", "2"]),
        "temperature": ([*f, "--head", "knn", "--k", "3"], [*f, "--head", "knn", "--k", "3", "--temperature", "0.07"]),
        "epochs": ([*f, "--head", "linear"], [*f, "--head", "linear", "--epochs", "3"]),
        "class_weight": (f, [*f, "--class-weight", "balanced"]),
        "normalize": (f, [*f, "--normalize", "l2"]),
        "validation": (f, [*f, "--validation", "kfold"]),
        "test_fraction": (held, [*held, "--test-fraction", "0.4"]),
        "layer": (f, [*f, "--layer", "layer3"]),
        "class_text": ([*zs], [*zs, "--class-text", str(w["root"] / "names.txt")]),
        "templates": ([*zs], [*zs, "--templates", str(w["root"] / "templates.txt")]),
        "init": ([*zs[:-2]], [*zs[:-2], "--init", "zeroshot"]),
        "calibrate": ([*f, "--dataset", f"folder:{w['larger']}"],
                      [*f, "--dataset", f"folder:{w['larger']}", "--calibrate", "temperature"]),
    })
    ft = ["--model", "resnet18", "--dataset", a, *tiny]
    finetune = {name: extract[name] for name in ("model", "dataset", "weights", "resolution", "image_column",
                                                 "label_column", "test_shards", "class_names")}
    finetune.update({
        "strategy": (ft, [*ft, "--strategy", "full"]),
        "classes": (ft, [*ft, "--classes", "cat,dog"]),
        "train_per_class": (ft, [*ft, "--train-per-class", "2"]),
        "seed": (ft, [*ft, "--seed", "1"]),
        "epochs": (ft, [*ft, "--epochs", "3"]),
        "lp_epochs": ([*ft, "--strategy", "lp-ft", "--epochs", "4"], [*ft, "--strategy", "lp-ft", "--epochs", "4",
                                                                     "--lp-epochs", "3"]),
        "batch_size": (ft, [*ft, "--batch-size", "16"]),
        "optimizer": (ft, [*ft, "--optimizer", "sgd"]),
        "lr": (ft, [*ft, "--lr", "0.01"]),
        "head_lr": (ft, [*ft, "--head-lr", "0.01"]),
        "weight_decay": (ft, [*ft, "--weight-decay", "0"]),
        "schedule": (ft, [*ft, "--schedule", "step"]),
        "augmentation": (ft, [*ft, "--augmentation", "crop"]),
        "unfreeze": (ft, [*ft, "--unfreeze", "layer3"]),
        "init_head": ([*ft, "--strategy", "lp-ft", "--init-head", str(w["head"])],
                      [*ft, "--strategy", "lp-ft", "--init-head", str(w["other_head"])]),
        "test_fraction": ([*ft, "--dataset", f"folder:{w['train_only']}"],
                          [*ft, "--dataset", f"folder:{w['train_only']}", "--test-fraction", "0.4"]),
        "bn": (ft, [*ft, "--bn", "train"]),
    })
    return {"extract": extract, "fit": fit, "finetune": finetune}


def identity_from_command_line(command: str, args: list) -> str:
    """The identity the command would record, as the CLI parses `args` (the library function's own)."""
    import importlib

    extract_stage, finetune_stage, fit_stage = (importlib.import_module(f"probe.{m}") for m in ("extract", "finetune", "fit"))

    params = dict(cli.main.commands[command].make_context(command, [str(a) for a in args]).params)
    params.pop("as_json", None)
    kwargs = cli._kwargs(**params)
    if command == "extract":
        return identity.canonical(extract_stage.identity_of(**kwargs))
    if command == "finetune":
        return identity.canonical(finetune_stage.identity_of(**kwargs))
    try:
        spec = fit_stage.identity_of(**kwargs)
    except ProbeError as e:  # a cache these options select but nobody extracted: the key it would have
        wanted = re.search(r"no cached features at (\S+);", str(e))
        if not wanted:
            raise
        return f"cache {Path(wanted[1]).name}"
    cache = cache_path("", spec["cache"]).name  # the same form as above, for the cache part
    return f"cache {cache} " + identity.canonical({k: v for k, v in spec.items() if k != "cache"})


@pytest.mark.parametrize("command", ["extract", "fit", "finetune"])
def test_every_option_changes_the_identity_or_is_declared_neutral(command, world):
    table = variants(world)[command]
    options = [p.name for p in cli.main.commands[command].params]
    for name in list(table) + list(NEUTRAL[command]):
        assert name in options, f"{command} has no option {name} any more: drop it from this test"
    for name in options:
        if name in NEUTRAL[command]:
            assert NEUTRAL[command][name], name
            continue
        assert name in table, (f"probe {command} --{name.replace('_', '-')} neither changes the identity in this "
                               "test nor is declared neutral with a reason: join it to the identity")
        first, second = (identity_from_command_line(command, args) for args in table[name])
        assert first != second, f"probe {command}: --{name.replace('_', '-')} does not change the identity"


def test_the_identity_of_a_fit_holds_its_caches_whole_key(world):
    from probe.cache import open_cache

    result = fit(model="resnet18", weights="none", resolution=32, dataset=f"folder:{world['a']}",
                 cache_dir=str(world["cache_dir"]), out=str(world["cache_dir"].parent / "check"))
    recorded = result.metrics["identity"]
    assert recorded["cache"] == open_cache(result.metrics["cache"]).key
    assert identity.digest(recorded) == result.metrics["identity_hash"]


# The eleven reproduced problems of issue 21, each as it was found.

def test_1_a_folder_under_a_dot_cache_path_has_a_content_fingerprint(tmp_path):
    """hf: data sets and saved models under ~/.cache/huggingface were fingerprinted as nothing."""
    import datasets

    from probe.backbones import weights_identity
    from probe.datasets import load_dataset

    folder = tmp_path / ".cache" / "huggingface" / "mine"
    write = lambda labels: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [np.zeros((8, 8, 3), np.uint8)] * 4, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ).save_to_disk(str(folder))
    write([0, 1, 0, 1])
    first = load_dataset(f"hf:{folder}").fingerprint
    write([1, 0, 1, 0])
    assert load_dataset(f"hf:{folder}").fingerprint != first
    model = tmp_path / ".cache" / "models" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"one")
    before = weights_identity(str(model))
    (model / "model.safetensors").write_bytes(b"two")
    assert weights_identity(str(model)) != before


def test_2_a_parquet_file_replaced_with_the_same_mtime_gives_the_new_rows(tmp_path):
    import datasets

    from probe.datasets import load_dataset

    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    target = folder / "train-00000-of-00001.parquet"

    def write(labels):
        datasets.Dataset.from_dict({"image": [np.zeros((8, 8, 3), np.uint8)] * 4, "label": labels},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "label": datasets.Value("string")})).to_parquet(str(target))
    write(["a", "b", "a", "b"])
    stat = target.stat()
    assert load_dataset(f"hf:{folder.parent}").splits["train"].labels.tolist() == [0, 1, 0, 1]
    write(["b", "a", "b", "b"])
    import os

    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p, rsync -a
    assert load_dataset(f"hf:{folder.parent}").splits["train"].labels.tolist() == [1, 0, 1, 1]


def test_3_a_test_label_unseen_in_train_keeps_the_official_test_split(tmp_path):
    import datasets

    from probe.datasets import load_dataset

    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    for split, labels in (("train", ["a", "b"] * 3), ("test", ["a", "b", "c", "a"])):
        datasets.Dataset.from_dict({"image": [np.zeros((8, 8, 3), np.uint8)] * len(labels), "label": labels},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "label": datasets.Value("string")})
                                   ).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    data = load_dataset(f"hf:{folder.parent}")
    assert "test" in data.splits and data.splits["test"].labels.tolist() == [0, 1, 0]  # row 2 ('c') left out
    assert "test split" in data.protocol and "less 1 rows" in data.protocol and "rows 2" in data.protocol


def test_4_a_folder_named_training_keeps_its_test_shards(tmp_path):
    from probe.datasets import load_dataset

    shards = _wds_shards(tmp_path / "pretrained_wds" / "training")
    data = load_dataset(f"wds:{shards}/train-{{0..1}}.tar")
    assert len(data.splits["train"]) == 8 and len(data.splits["test"]) == 8


def test_5_compare_pivot_keeps_runs_of_other_options_apart(world, run_cli):
    common = ["--models", "resnet18", "--datasets", f"folder:{world['b']}", "--weights", "none", "--resolution", "32",
              "--out", "suite"]
    assert run_cli("suite", *common).exit_code == 0
    assert run_cli("suite", *common, "--train-per-class", "2").exit_code == 0
    suite = json.loads(Path("suite/suite.json").read_text())["pairs"][0]["test_accuracy"]
    pivot = run_cli("compare", "--pivot", "suite", "--out", "table")
    assert pivot.exit_code == 0, pivot.output
    rows = [line for line in pivot.output.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 2 and any("train_per_class=2" in r for r in rows) and any("train_per_class=null" in r for r in rows)
    assert any(f"{suite:.2%}" in r for r in rows if "train_per_class=2" in r)  # the suite's own number, in its row
    merged = run_cli("compare", "--pivot", "suite", "--merge", "--out", "merged")
    assert merged.exit_code == 0 and len([ln for ln in merged.output.splitlines() if ln.startswith("| resnet18")]) == 1
    assert "differing in train_per_class" in merged.output and "the newest" in merged.output


def test_6_depth_never_reuses_a_fit_of_another_seed_or_a_fixed_C(world, run_cli):
    cache = next(Path(world["cache_dir"]).glob("folder-a__*__L*.h5"))
    fixed = run_cli("fit", "--features", cache, "--layer", "layer3", "--C", "1", "--json")
    assert fixed.exit_code == 0
    depth = run_cli("depth", cache)
    assert depth.exit_code == 0, depth.output
    point = next(p for p in json.loads(Path("runs/depth/depth.json").read_text())["curves"][0]["points"]
                 if p["layer"] == "layer3")
    metrics = json.loads((Path(point["run"]) / "metrics.json").read_text())
    assert metrics["hyperparameters"]["C_from"] != "--C" and metrics["identity"]["params"]["C"] is None
    assert run_cli("depth", cache, "--seed", "1").exit_code == 0
    seeded = json.loads(Path("runs/depth/depth.json").read_text())["curves"][0]["points"]
    assert all(json.loads((Path(p["run"]) / "metrics.json").read_text())["seed"] == 1 for p in seeded)


def test_7_depth_places_a_layer_among_all_the_models_blocks(tmp_path, run_cli):
    args = ["extract", "--model", "timm:test_vit", "--weights", "none", "--dataset", f"folder:{tmp_path / 'd'}",
            "--resolution", "32"]
    copy_sample(tmp_path / "d", per_class=3, test_per_class=1, classes=["cat", "dog"])
    assert run_cli(*args, "--layers", "blocks.1,blocks.5").exit_code == 0
    assert run_cli(*args, "--layers", "all").exit_code == 0
    caches = sorted(Path("cache").glob("*__L*.h5"))
    assert run_cli("depth", *caches).exit_code == 0
    depths = [{p["layer"]: p["depth"] for p in c["points"]}
              for c in json.loads(Path("runs/depth/depth.json").read_text())["curves"]]
    assert all(d["blocks.1"] == pytest.approx(2 / 6) for d in depths)


def test_8_knn_on_a_cache_with_views(world, run_cli):
    assert run_cli("extract", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset",
                   f"folder:{world['a']}", "--views", "1").exit_code == 0
    cache = next(Path("cache").glob("*__1xrrc__*.h5"))
    result = run_cli("fit", "--features", cache, "--head", "knn", "--k", "5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_train_rows"] == 2 * json.loads(result.output)["n_train"]


def test_9_a_streamed_knn_head_predicts_from_any_folder(world, run_cli, tmp_path, monkeypatch):
    from probe.device import resident_bytes
    from probe.datasets import SAMPLE_DIR

    assert run_cli("extract", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset",
                   "sample").exit_code == 0
    cap = f"{(resident_bytes() >> 20) + 4}MB"  # just above what the process holds: the rows are streamed
    fitted = run_cli("fit", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", "sample",
                     "--head", "knn", "--max-memory", cap, "--json")
    assert fitted.exit_code == 0 and json.loads(fitted.output)["streamed"], fitted.output
    head = next(Path("runs").glob("*__knn*")).resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = next((SAMPLE_DIR / "test" / "cat").glob("*.jpg"))
    predicted = run_cli("predict", "--head", head, image)
    assert predicted.exit_code == 0, predicted.output


def test_10_test_shards_that_are_training_shards_are_refused(world, run_cli):
    from conftest import assert_one_line_error

    shards = world["wds"]
    result = run_cli("extract", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset",
                     f"wds:{shards}/train-{{0..1}}.tar", "--test-shards", f"{shards}/train-1.tar")
    assert_one_line_error(result, "share 1 shard")


def test_11_fit_finds_a_views_cache_by_the_options_extract_took(world, run_cli):
    args = ["--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", f"folder:{world['b']}"]
    assert run_cli("extract", *args, "--views", "2", "--augment", "crop").exit_code == 0
    result = run_cli("fit", *args, "--views", "2", "--augment", "crop", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["views"] == 2 and json.loads(result.output)["augment"] == "crop"


# Also noticed in the project's notes.

def test_cache_rm_removes_only_what_probe_wrote(tmp_path, run_cli):
    import h5py

    from conftest import assert_one_line_error

    other = tmp_path / "cache" / "mine.h5"
    other.parent.mkdir()
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2, 3]
    assert_one_line_error(run_cli("cache", "rm", other), "not a probe cache")
    assert other.exists()
    lock = tmp_path / "cache" / "x__0123456789.h5.lock"
    lock.write_text("")
    removed = run_cli("cache", "rm", lock)
    assert removed.exit_code == 0 and not lock.exists()


def test_depth_checks_every_cache_before_fitting_any(world, run_cli):
    cache = next(Path(world["cache_dir"]).glob("folder-a__*__L*.h5"))
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("depth", cache, "missing.h5"), "missing.h5")
    assert not Path("runs").exists()  # nothing fitted before the missing input was found
