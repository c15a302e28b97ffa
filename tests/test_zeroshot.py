"""Zero-shot and retrieval on the same cache as the linear probe (issue 24), offline, on tiny random
image-text models: an open_clip local-dir folder and transformers CLIP and SigLIP folders. Each is
checked against the model's own library: open_clip's build_zero_shot_classifier, CLIP_benchmark's
zero_shot_classifier, transformers' get_text_features and the model's forward pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, copy_sample, hf_text_folder, open_clip_text_folder
from probe import zeroshot
from probe.backbones import create_backbone
from probe.cache import open_cache
from probe.heads import ZeroShotHead
from probe.runs import load_head

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_text")
    return {"open_clip": open_clip_text_folder(root / "open_clip"), "clip": hf_text_folder(root / "clip", "clip"),
            "siglip": hf_text_folder(root / "siglip", "siglip")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return copy_sample(tmp_path_factory.mktemp("zs") / "d", per_class=6, test_per_class=4, classes=CLASSES)


def _spec(model: str, names=("cat", "dog"), templates=("a photo of a {c}.", "a drawing of the {c}.")) -> dict:
    from probe.backbones import resolve

    return zeroshot.text_identity({"model": resolve(model).name, "weights": "default"}, list(names), list(templates))


def test_prompts_are_clip_benchmarks_own():
    """probe/prompts.json holds CLIP_benchmark's names and templates for the named data sets, unchanged
    (Caltech-101's without the background class, which torchvision's Caltech101 drops)."""
    import clip_benchmark

    folder = Path(clip_benchmark.__file__).parent / "datasets"
    names = json.loads((folder / "en_classnames.json").read_text())
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())
    p = zeroshot.prompts()
    assert p["default_templates"] == templates["imagenet1k"] and len(p["default_templates"]) == 80
    for ours, theirs in p["benchmark_names"].items():
        if ours != "sample":
            assert p["templates"][ours] == templates[theirs], ours
        if ours in p["class_names"]:
            assert p["class_names"][ours] == names[theirs][1 if ours == "caltech101" else 0:], ours
    assert zeroshot.templates("sample") == templates["cifar10"]
    assert zeroshot.class_names("folder:/x", ["golden_retriever", "sea-lion"]) == ["golden retriever", "sea lion"]
    assert zeroshot.class_names("eurosat", [str(i) for i in range(10)])[0] == "annual crop land"


def test_open_clip_class_embeddings_are_open_clips_and_clip_benchmarks(models, tmp_path):
    import open_clip
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    name = f"open_clip:local-dir:{models['open_clip']}"
    spec = _spec(name)
    ours, scale, bias = zeroshot.class_embeddings(spec, "default", tmp_path)
    model = open_clip.create_model(f"local-dir:{models['open_clip']}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{models['open_clip']}")
    theirs = build_zero_shot_classifier(model, tokenizer, spec["class_names"],
                                        [t.replace("{c}", "{}") for t in spec["templates"]], device="cpu")
    np.testing.assert_allclose(ours, theirs.T.numpy(), atol=1e-5)
    peer = zero_shot_classifier(model, tokenizer, spec["class_names"], spec["templates"], "cpu", amp=False)
    np.testing.assert_allclose(ours, peer.T.numpy(), atol=1e-5)
    assert scale == pytest.approx(float(model.logit_scale.exp().detach())) and bias == 0.0
    # Kept under the cache folder by identity, and read back (a changed template is another file).
    assert len(list((tmp_path / "text").glob("*.npz"))) == 1
    again, _, _ = zeroshot.class_embeddings(spec, "default", tmp_path)
    np.testing.assert_array_equal(again, ours)
    zeroshot.class_embeddings(_spec(name, templates=("a {c}.",)), "default", tmp_path)
    assert len(list((tmp_path / "text").glob("*.npz"))) == 2


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_zero_shot_is_the_models_own_forward_pass(models, kind, tmp_path):
    """Class embeddings from get_text_features; probe's probabilities on the --pool proj feature equal the
    softmax of the model's own logits_per_image (with one template the class embedding is the text's)."""
    from transformers import AutoModel, AutoTokenizer

    folder = models[kind]
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    padding = "max_length" if kind == "siglip" else True
    templates = ["a photo of a {c}.", "a blurry photo of the {c}."]
    spec = _spec(f"hf:{folder}", CLASSES, templates)
    ours, scale, bias = zeroshot.class_embeddings(spec, "default", tmp_path)

    def text_embeddings(texts):
        tokens = tokenizer(texts, padding=padding, return_tensors="pt")
        with torch.inference_mode():
            out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(out, dim=-1)

    reference = torch.stack([text_embeddings([t.format(c=c) for t in templates]).mean(0) for c in CLASSES])
    np.testing.assert_allclose(ours, torch.nn.functional.normalize(reference, dim=-1).numpy(), atol=1e-5)
    assert scale == pytest.approx(float(model.logit_scale.exp().detach()))
    assert bias == pytest.approx(float(model.logit_bias.detach()) if kind == "siglip" else 0.0)

    one, scale, bias = zeroshot.class_embeddings(_spec(f"hf:{folder}", CLASSES, ["a photo of a {c}."]), "default", tmp_path)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = create_backbone(f"hf:{folder}", pool="proj")(pixels).numpy()
    head = ZeroShotHead(one, scale, bias).fit(features[:1], np.array([0]))
    tokens = tokenizer([f"a photo of a {c}." for c in CLASSES], padding=padding, return_tensors="pt")
    with torch.inference_mode():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits_per_image
    np.testing.assert_allclose(head.predict_proba(features), torch.softmax(logits.double(), 1).numpy(), atol=1e-5)


def test_fit_zeroshot_predict_and_the_curves_zero_point(run_cli, models, data, tmp_path):
    """The whole path on an open_clip cache: extract --pool proj, fit --head zeroshot (metrics as any fit,
    predictions the model's own logits on the cache), predict, and the curve's k = 0 point beside logreg."""
    import h5py
    import open_clip

    model = f"open_clip:local-dir:{models['open_clip']}"
    args = ["--model", model, "--dataset", f"folder:{data}", "--pool", "proj"]
    assert run_cli("extract", *args).exit_code == 0
    result = run_cli("fit", *args, "--head", "zeroshot", "--out", "zs")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert metrics["method"] == "zeroshot" and metrics["n_train"] == 0 and metrics["n_test"] == 12
    assert set(metrics["intervals"]) >= {"test_accuracy", "balanced_accuracy"} and "ece" in metrics["calibration"]
    text = metrics["identity"]["params"]["text"]
    assert text["class_names"] == CLASSES and text["templates"] == zeroshot.prompts()["default_templates"]

    cache = open_cache(metrics["cache"])
    clip = open_clip.create_model(f"local-dir:{models['open_clip']}").eval()
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    weights = build_zero_shot_classifier(clip, open_clip.get_tokenizer(f"local-dir:{models['open_clip']}"), CLASSES,
                                         [t.replace("{c}", "{}") for t in text["templates"]], device="cpu")
    X, _ = cache.load("test")
    logits = clip.logit_scale.exp().detach().item() * torch.nn.functional.normalize(torch.as_tensor(X), dim=1) @ weights
    reference = torch.softmax(logits.double(), 1).detach().numpy()
    with h5py.File(tmp_path / "zs" / "predictions.h5") as f:
        assert (f["predicted"][:] == reference.argmax(1)).all()
        np.testing.assert_allclose(f["p_true"][:], reference[np.arange(len(X)), f["true"][:]], atol=1e-5)

    image = next((data / "test" / "cat").iterdir())
    shown = run_cli("predict", "--head", "zs", str(image))
    assert shown.exit_code == 0 and str(image) in shown.output

    (tmp_path / "names.txt").write_text("a cat\na dog\na frog\n")
    (tmp_path / "templates.txt").write_text("a photo of {c}.\n")
    custom = run_cli("fit", *args, "--head", "zeroshot", "--class-text", "names.txt", "--templates", "templates.txt",
                     "--out", "zs2")
    assert custom.exit_code == 0, custom.output
    params = json.loads((tmp_path / "zs2" / "metrics.json").read_text())["identity"]["params"]["text"]
    assert params["class_names"] == ["a cat", "a dog", "a frog"] and params["templates"] == ["a photo of {c}."]

    curve = run_cli("curve", metrics["cache"], "--head", "zeroshot,logreg", "--shots", "1,all", "--seeds", "2",
                    "--out", "curve")
    assert curve.exit_code == 0, curve.output
    lines = json.loads((tmp_path / "curve" / "curve.json").read_text())["lines"]
    assert [p["shots"] for p in lines[0]["points"]] == [0] and lines[0]["points"][0]["mean"] == metrics["test_accuracy"]
    assert [p["shots"] for p in lines[1]["points"]] == [1, "all"]
    assert "0 (zero-shot)" in (tmp_path / "curve" / "curve.md").read_text()


def test_the_suite_takes_the_zeroshot_head_on_the_joint_pool(run_cli, models, data, tmp_path):
    model = f"open_clip:local-dir:{models['open_clip']}"
    result = run_cli("suite", "--models", model, "--datasets", f"folder:{data}", "--head", "zeroshot,logreg", "--out", "s")
    assert result.exit_code == 0, result.output
    pairs = json.loads((tmp_path / "s" / "suite.json").read_text())["pairs"]
    assert [p["head"] for p in pairs] == ["zeroshot", "logreg"] and all(p["status"] == "done" for p in pairs)
    pools = [json.loads((Path(p["run"]) / "metrics.json").read_text())["pool"] for p in pairs]
    assert pools == ["proj", "pooled"]  # zero-shot on the text space's embedding, logreg on the default feature
    assert "zeroshot" in (tmp_path / "s" / "suite.md").read_text()


def test_bad_zeroshot_input_is_one_line(run_cli, models, data, sample_cache, tmp_path):
    model = f"open_clip:local-dir:{models['open_clip']}"
    args = ["--model", model, "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0  # the default pool: before the projection
    assert_one_line_error(run_cli("fit", *args, "--head", "zeroshot"), "--pool proj")
    assert_one_line_error(run_cli("fit", "--features", sample_cache, "--head", "zeroshot"), "no text tower")
    assert run_cli("extract", *args, "--pool", "proj").exit_code == 0
    proj = [*args, "--pool", "proj", "--head", "zeroshot"]
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "bad.txt").write_text("a photo\n")
    assert_one_line_error(run_cli("fit", *proj, "--class-text", "two.txt"), "2 names", "3 classes")
    assert_one_line_error(run_cli("fit", *proj, "--templates", "bad.txt"), "{c}")
    assert_one_line_error(run_cli("fit", *proj, "--templates", "missing.txt"), "missing.txt")
    assert_one_line_error(run_cli("fit", *proj, "--normalize", "l2"), "--normalize")
    assert_one_line_error(run_cli("fit", *args, "--templates", "bad.txt"), "--templates", "zeroshot")
    assert not list(Path(tmp_path).glob("runs/*"))


def test_retrieval_is_a_direct_computation(run_cli, sample_cache, tmp_path):
    """recall@k and mAP against a plain computation with scikit-learn's average_precision_score."""
    from sklearn.metrics import average_precision_score

    result = run_cli("retrieval", sample_cache, "--out", "r", "--device", "cpu")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "r" / "retrieval.json").read_text())
    cache = open_cache(sample_cache)
    gallery, gy = cache.load("train")
    queries, qy = cache.load("test")
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ g.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")
    for k in (1, 5, 10):
        assert m[f"recall@{k}"] == pytest.approx(np.mean([(gy[o[:k]] == y).any() for o, y in zip(order, qy)]), abs=1e-3)
        low, high = m["intervals"][f"recall@{k}"]
        assert low <= m[f"recall@{k}"] <= high
    ap = [average_precision_score(gy == y, s) for s, y in zip(sims, qy)]
    assert m["mAP"] == pytest.approx(np.mean(ap), abs=1e-3)
    assert m["n_queries"] == 500 and m["n_gallery"] == 1000 and m["identity"]["cache"] == cache.key
    assert 0.1 < m["mAP"] < 1 and m["recall@10"] >= m["recall@5"] >= m["recall@1"]
    assert_one_line_error(run_cli("retrieval", "no_such.h5"), "no_such.h5")


def _caption_sets(root: Path) -> dict[str, Path]:
    """The same 12 sample images with 2 or 3 captions each, in Flickr's CSV layout and in a COCO
    captions JSON whose images sit in a val2014/ folder beside it."""
    import shutil

    from probe.datasets import SAMPLE_DIR

    files = [f for c in ("cat", "ship", "frog") for f in sorted((SAMPLE_DIR / "test" / c).glob("*.jpg"))[:4]]
    flickr, coco = root / "flickr", root / "coco"
    (coco / "val2014").mkdir(parents=True)
    flickr.mkdir()
    lines, images, annotations = ["image,caption"], [], []
    for i, f in enumerate(files):
        name = f"{f.parent.name}_{f.stem}.jpg"
        shutil.copy(f, flickr / name)
        shutil.copy(f, coco / "val2014" / name)
        images.append({"id": 100 - i, "file_name": name})  # ids out of file order: COCO's order is by id
        for j in range(2 + i % 2):
            caption = f"a {f.parent.name} photo, number {i}, take {j}"
            lines.append(f"{name},{caption}")
            annotations.append({"id": len(annotations), "image_id": 100 - i, "caption": caption})
    (flickr / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    (coco / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return {"flickr": flickr / "flickr30k_test_karpathy.txt", "coco": coco / "coco_test_karpathy.json"}


@pytest.mark.parametrize("kind,layout", [("open_clip", "flickr"), ("open_clip", "coco"), ("clip", "flickr"),
                                         ("siglip", "flickr")])
def test_image_text_retrieval_is_clip_benchmarks_recall(run_cli, models, kind, layout, tmp_path):
    """Caption sets in their published layouts read as CLIP_benchmark reads them, and recall@k in both
    directions equal to CLIP_benchmark's recall_at_k on the same embeddings."""
    import open_clip
    from clip_benchmark.datasets.flickr import Flickr
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    from probe.datasets import load_dataset

    annotations = _caption_sets(tmp_path / "sets")[layout]
    data = load_dataset(f"captions:{annotations}")
    if layout == "flickr":
        assert [(Path(f).name, c) for f, c in zip(data.splits["train"].images.paths, data.captions)] == \
            Flickr(str(annotations.parent), str(annotations)).data
    else:  # torchvision's CocoCaptions, as CLIP_benchmark reads mscoco_captions
        from torchvision.datasets import CocoCaptions

        theirs = CocoCaptions(str(annotations.parent / "val2014"), str(annotations))
        assert [Path(f).name for f in data.splits["train"].images.paths] == \
            [theirs.coco.loadImgs(i)[0]["file_name"] for i in theirs.ids]
        assert data.captions == [theirs._load_target(i) for i in theirs.ids]

    model = f"open_clip:local-dir:{models['open_clip']}" if kind == "open_clip" else f"hf:{models[kind]}"
    assert run_cli("extract", "--model", model, "--pool", "proj", "--dataset", f"captions:{annotations}").exit_code == 0
    cache = next((tmp_path / "cache").glob("captions*.h5"))
    result = run_cli("retrieval", cache, "--out", "r")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "r" / "retrieval.json").read_text())
    assert m["n_images"] == 12 and m["n_texts"] == 30

    captions = [t for c in data.captions for t in c]
    with torch.inference_mode():
        if kind == "open_clip":
            clip = open_clip.create_model(f"local-dir:{models['open_clip']}").eval()
            texts = clip.encode_text(open_clip.get_tokenizer(f"local-dir:{models['open_clip']}")(captions))
        else:
            from transformers import AutoModel, AutoTokenizer

            tokens = AutoTokenizer.from_pretrained(models[kind])(captions, return_tensors="pt",
                                                                 padding="max_length" if kind == "siglip" else True)
            texts = AutoModel.from_pretrained(models[kind]).eval().get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            texts = texts if isinstance(texts, torch.Tensor) else texts.pooler_output
    texts = torch.nn.functional.normalize(texts, dim=-1)
    images = torch.nn.functional.normalize(torch.as_tensor(open_cache(cache).load("train")[0]), dim=-1)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.as_tensor(np.repeat(np.arange(12), [len(c) for c in data.captions]))] = True
    for k in (1, 5, 10):
        t2i = (batchify(recall_at_k, scores, positive, 4, "cpu", k=k) > 0).float().mean().item()
        i2t = (batchify(recall_at_k, scores.T, positive.T, 4, "cpu", k=k) > 0).float().mean().item()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i) and m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert_one_line_error(run_cli("fit", "--features", cache), "probe retrieval")


def test_init_zeroshot_starts_from_and_regularizes_towards_the_zero_shot_classifier(run_cli, models, data, tmp_path):
    """The zero-shot classifier as a layer on the normalized features gives the zero-shot head's own
    probabilities; logreg --init zeroshot at a tiny C stays at it, and linear starts from it."""
    from scipy.special import softmax

    from probe.heads import LogisticProbe, TorchLinear, normalization_steps

    model = f"open_clip:local-dir:{models['open_clip']}"
    args = ["--model", model, "--dataset", f"folder:{data}", "--pool", "proj"]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--head", "zeroshot", "--out", "zs").exit_code == 0
    zs = load_head(tmp_path / "zs")["pipeline"]
    cache = open_cache(json.loads((tmp_path / "zs" / "metrics.json").read_text())["cache"])
    X, y = cache.load("train")
    head = zs[-1]
    for kind in ("l2", "l2+standardize"):
        steps = normalization_steps(kind)
        Z = X
        for step in steps:
            Z = step.fit_transform(Z)
        layer = zeroshot.weights_after(steps, head.weights_, head.logit_scale, head.logit_bias)
        np.testing.assert_allclose(softmax(Z @ layer[:, :-1].T + layer[:, -1], axis=1), zs.predict_proba(X), atol=1e-5)
        fitted = LogisticProbe(C=1e-8, prior=layer).fit(Z, y)
        np.testing.assert_allclose(fitted.coef_, layer[:, :-1], rtol=1e-3, atol=1e-4)  # regularized towards it
        free = LogisticProbe(C=1e-8).fit(Z, y)
        assert np.abs(free.coef_).max() < 1e-3  # without the prior, towards zero
        started = TorchLinear(lr=1e-12, init=layer, min_steps=1, epochs=1, device="cpu").fit(Z, y)
        np.testing.assert_allclose(started.module_.weight.detach().numpy(), layer[:, :-1], rtol=1e-4, atol=1e-6)

    result = run_cli("fit", *args, "--head", "logreg", "--init", "zeroshot", "--C", "1e-8", "--out", "init")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "init" / "metrics.json").read_text())
    assert metrics["identity"]["params"]["init"]["kind"] == "zeroshot"
    fitted = load_head(tmp_path / "init")["pipeline"]
    # At a tiny C the head's weights are the zero-shot classifier's in its own normalized space (the
    # intercept, unpenalized as in scikit-learn, fits the class shares).
    prior = zeroshot.weights_after(list(fitted[:-1]), head.weights_, head.logit_scale, head.logit_bias)
    np.testing.assert_allclose(fitted[-1].coef_, prior[:, :-1], rtol=1e-3, atol=1e-4)
    assert_one_line_error(run_cli("fit", *args, "--head", "knn", "--init", "zeroshot"), "--init zeroshot", "knn")
    assert_one_line_error(run_cli("fit", *args, "--init", "zeroshot", "--normalize", "none"), "--normalize l2")


def test_what_a_new_user_broke(run_cli, models, data, tmp_path):
    """The break-test's findings, each as it was found: a saved model changed after extraction, caption
    files that cannot be a retrieval set, options that would do nothing, the text cache in probe cache."""
    import shutil

    folder = tmp_path / "oc2"
    shutil.copytree(models["open_clip"], folder)
    model = f"open_clip:local-dir:{folder}"
    args = ["--model", model, "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args, "--pool", "proj").exit_code == 0
    # --head zeroshot finds the --pool proj cache by itself; the run folder names --init
    assert run_cli("fit", *args, "--head", "zeroshot", "--out", "zs").exit_code == 0
    assert run_cli("fit", *args, "--init", "zeroshot").exit_code == 0
    assert len(list((tmp_path / "runs").glob("*__init-zeroshot__*"))) == 1
    assert_one_line_error(run_cli("fit", *args, "--head", "zeroshot", "--train-per-class", "2"), "--train-per-class")
    listed = run_cli("cache", "ls")
    assert "text embeddings" in listed.output and "1 file(s)" in listed.output
    assert run_cli("cache", "rm", "cache/text").exit_code == 0 and not list((tmp_path / "cache" / "text").glob("*"))
    # The saved model's weights change after extraction: its text tower is not the image tower's any more.
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, folder / "open_clip_pytorch_model.bin")
    cache = json.loads((tmp_path / "zs" / "metrics.json").read_text())["cache"]
    assert_one_line_error(run_cli("fit", "--features", cache, "--head", "zeroshot", "--out", "zs2"), "changed since")
    assert not (tmp_path / "zs2").exists() and not list((tmp_path / "cache" / "text").glob("*"))

    sets = _caption_sets(tmp_path / "sets")
    coco = json.loads(sets["coco"].read_text())
    for name, change, words in (("none.json", lambda c: c.update(annotations=[]), ["has no caption"]),
                                ("number.json", lambda c: c["annotations"][0].update(caption=5), ["not text"]),
                                ("orphan.json", lambda c: c["annotations"][0].update(image_id=7), ["not among its images"])):
        broken = json.loads(json.dumps(coco))
        change(broken)
        (sets["coco"].parent / name).write_text(json.dumps(broken))
        assert_one_line_error(run_cli("extract", "--model", f"open_clip:local-dir:{models['open_clip']}", "--pool", "proj",
                                      "--dataset", f"captions:{sets['coco'].parent / name}"), *words)
    flickr = f"captions:{sets['flickr']}"
    assert_one_line_error(run_cli("extract", "--model", "resnet18", "--weights", "none", "--dataset", flickr), "no text tower")
    assert_one_line_error(run_cli("suite", "--models", model, "--datasets", flickr), "caption set")
    assert run_cli("extract", "--model", f"open_clip:local-dir:{models['open_clip']}", "--pool", "proj",
                   "--dataset", flickr).exit_code == 0
    caption_cache = next((tmp_path / "cache").glob("captions*.h5"))
    assert_one_line_error(run_cli("retrieval", caption_cache, "--layer", "blocks.0"), "--layer")


def test_an_hf_tokenizer_without_a_length_limit_is_cut_at_the_text_towers(models, tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(models["clip"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    spec = _spec(f"hf:{folder}", ["cat " * 40, "dog"], ["a photo of a {c}."])
    embeddings, _, _ = zeroshot.class_embeddings(spec, "default", tmp_path)
    assert embeddings.shape == (2, 16) and np.isfinite(embeddings).all()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(Exception, match="has no tokenizer"):
        zeroshot.class_embeddings(_spec(f"hf:{folder}", ["cat", "dog"], ["{c}"]), "default", tmp_path)
