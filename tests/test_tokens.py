"""Token caches (probe extract --tokens), the attentive probe, and dense probing (--head seg-linear) on
segmentation sets in their published layouts, on real tiny models and real files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import layouts
from conftest import assert_one_line_error, copy_sample, hf_text_folder, kill_extract_after_shards, open_clip_text_folder
from probe.attentive import AttentivePooler
from probe.backbones import create_backbone, token_grid
from probe.cache import PartialCache, open_cache
from probe.datasets import load_dataset
from probe.datasets.segmentation import IGNORE, cell_labels
from probe.extract import Embedder, extract
from probe.fit import fit
from probe.preprocess import Preprocess


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (n, 3, size, size)).astype(np.float32))


def _reference_tokens(model: str, weights: str, size: int, images: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The final token map as each library gives it, without probe's capture: [N, C, H, W]."""
    net = create_backbone(model, weights, size)
    pre = Preprocess(size, size)
    x = (images - torch.tensor(pre.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255)
    with torch.inference_mode():
        if model == "resnet18":  # torchvision: layer4's map
            t = net.conv1(x)
            t = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(t)))))))
            return t
        if model == "efficientnet_lite0":
            return net.forward_features(x)
        if model == "timm:test_mambaout":  # channels-last (output_fmt NHWC): stored as every other map
            return net.model.forward_features(x).permute(0, 3, 1, 2)
        if model == "timm:test_vit":
            t = net.model.forward_features(x)
            return t[:, net.model.num_prefix_tokens:].transpose(1, 2).reshape(len(x), -1, size // 16, size // 16)
        if model.startswith("open_clip:"):
            net.visual.output_tokens = True
            _, t = net.visual(x)
            return t.transpose(1, 2).reshape(len(x), -1, size // 16, size // 16)
        out = net.model(pixel_values=x)  # hf CLIP: every token through post_layernorm, the class token dropped
        t = getattr(net.model, "vision_model", net.model).post_layernorm(out.last_hidden_state)[:, 1:]
        return t.transpose(1, 2).reshape(len(x), -1, size // 16, size // 16)


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0", "timm:test_vit", "timm:test_mambaout", "open_clip", "hf"])
def test_each_family_stores_its_own_final_token_map(model, tmp_path):
    size = 64
    if model == "open_clip":
        model = f"open_clip:local-dir:{open_clip_text_folder(tmp_path / 'oc', image_size=size)}"
    elif model == "hf":
        model = f"hf:{hf_text_folder(tmp_path / 'hf', 'clip')}"
        size = 32
    weights = "default" if model == "efficientnet_lite0" or model.startswith(("open_clip", "hf")) else "none"
    pre = Preprocess(size, size)
    images = _pixels(3, size)
    embed = Embedder(model, weights, pre, None, torch.device("cpu"), tokens=0)
    features = embed(images)
    expected = _reference_tokens(model, weights, size, images, tmp_path)
    side, _, width = embed.token_shape
    assert (side, side, width) == (expected.shape[2], expected.shape[3], expected.shape[1])
    got = embed.last_tokens.reshape(3, side, side, width).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
    assert features.shape == (3, embed.feature_dim)  # the pooled feature of the same pass, as before
    torch.testing.assert_close(features, Embedder(model, weights, pre, None, torch.device("cpu"))(images))


def test_token_grid_average_pools_the_map():
    images = _pixels(2, 128)
    native = Embedder("timm:test_vit", "none", Preprocess(128, 128), None, torch.device("cpu"), tokens=0)
    pooled = Embedder("timm:test_vit", "none", Preprocess(128, 128), None, torch.device("cpu"), tokens=4)
    native(images), pooled(images)
    side, _, width = native.token_shape
    grid = native.last_tokens.reshape(2, side, side, width).permute(0, 3, 1, 2)
    expected = torch.nn.functional.adaptive_avg_pool2d(grid, 4).permute(0, 2, 3, 1).reshape(2, -1)
    assert pooled.token_shape == (4, 4, width)
    torch.testing.assert_close(pooled.last_tokens, expected)


def test_token_grid_of_vit_tokens_drops_prefix_tokens():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # a class token and 2x2 patches
    grid = token_grid(tokens, 1)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, 2])  # row-major patches


def test_extract_tokens_cli_writes_one_chunk_per_image_and_a_key_of_its_own(run_cli, tmp_path):
    data = copy_sample(tmp_path / "data", 2, 1)
    args = ["extract", "--model", "efficientnet_lite0", "--dataset", f"folder:{data}", "--resolution", 96]
    result = run_cli(*args, "--tokens")
    assert result.exit_code == 0, result.output
    plain = run_cli(*args)
    assert plain.exit_code == 0 and "cache hit" not in plain.output  # another key: the plain cache is its own file
    files = sorted((tmp_path / "cache").glob("*tokens*.h5"))
    assert len(files) == 1
    cache = open_cache(files[0])
    assert cache.token_shape == (3, 3, 1280) and cache.key["tokens"] == {"grid": 0, "dtype": "float16"}
    with h5py.File(files[0]) as f:
        tokens = f["train/tokens"]
        assert tokens.shape == (20, 9 * 1280) and tokens.chunks == (1, 9 * 1280) and tokens.dtype == np.float16
        mean = tokens[...].astype(np.float32).reshape(20, 9, 1280).mean(1)
        np.testing.assert_allclose(mean, f["train/features"][...], atol=2e-2)  # lite0 pools its map by the mean
    assert run_cli(*args, "--tokens").output.startswith("cache hit")
    assert_one_line_error(run_cli(*args, "--tokens", "--token-grid", 5), "--token-grid 5", "3x3")
    assert_one_line_error(run_cli(*args, "--token-grid", 2), "--token-grid")
    assert_one_line_error(run_cli(*args, "--token-dtype", "float32"), "--tokens")


def test_tokens_refuse_a_disk_too_small_before_the_pass(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    data = copy_sample(tmp_path / "data", 2, 1)
    usage = namedtuple("usage", "total used free")
    from probe.files import DISK_MARGIN

    # 30 images of 3x3x1280 float16 maps are 0.7 MB: a disk with 0.1 MB free past the margin cannot hold them.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, DISK_MARGIN + (100 << 10)))
    with pytest.raises(Exception, match="not enough disk space for --tokens"):
        extract(model="efficientnet_lite0", dataset=f"folder:{data}", resolution=96, tokens=True,
                cache_dir=str(tmp_path / "cache"), progress=False)
    assert not list((tmp_path / "cache").glob("*.h5*"))  # nothing half-written: no file, no shards, no lock


def test_a_token_shard_without_its_feature_shard_is_redone(tmp_path):
    key = {"dtype": "float32", "tokens": {"grid": 0, "dtype": "float16"}}
    parts = PartialCache(tmp_path / "c.h5", key)
    parts.start()
    parts.write("train", 0, np.ones((2, 3), np.float32), np.ones((2, 4), np.float16))
    # Killed between the two writes of the next shard: its tokens are there, its features not.
    np.save(parts.dir / "train-000000002-000000004.tokens.npy", np.ones((2, 4), np.float16))
    assert parts.gaps("train", 0, 4) == [(2, 4)]  # the rows are still to do; the features' shard vouches for both


def test_attentive_pooler_equals_attention_over_projected_keys_and_values():
    torch.manual_seed(0)
    pooler = AttentivePooler(width=32, n_tokens=9, heads=4, queries=1, mlp_ratio=2.0, classes=5)
    X = torch.randn(6, 9 * 32)
    x = pooler.tokens(X)
    q = pooler.q(pooler.query_tokens).expand(6, -1, -1)
    k, v = pooler.kv(x).split(32, -1)
    heads = lambda t: t.reshape(6, -1, 4, 8).transpose(1, 2)  # noqa: E731
    attended = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    out = pooler.query_tokens + pooler.proj(attended.transpose(1, 2).reshape(6, -1, 32))
    out = out + pooler.mlp(pooler.norm2(out))
    torch.testing.assert_close(pooler(X), pooler.linear(out.mean(1)), atol=1e-5, rtol=1e-5)


def test_fit_attentive_on_tokens_predicts_as_probe_predict_does(run_cli, tmp_path):
    data = copy_sample(tmp_path / "data", 6, 2)
    common = ["--model", "timm:test_vit", "--weights", "none", "--dataset", f"folder:{data}", "--resolution", 64]
    assert run_cli("extract", *common, "--tokens").exit_code == 0
    result = run_cli("fit", *common, "--head", "attentive", "--epochs", 1, "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert m["layer"] == "tokens" and m["feature_dim"] == 16 * 64 and m["n_train"] == 60
    assert m["hyperparameters"]["n_tokens"] == 16
    run = Path(m["cache"]).parent.parent / "runs"
    folder = next(run.glob("*attentive*"))
    with h5py.File(folder / "predictions.h5") as f:
        stored, top = f["predicted"][...], f["top_k_probability"][:, 0]
    images = sorted((data / "test").glob("*/*.jpg"))
    predicted = json.loads(run_cli("predict", "--head", folder, *images, "--json").output)
    # The test split's order is the folder's (classes, then files): the same images through the backbone again.
    assert [r["top"][0]["class"] for r in predicted] == [m["classes"][c] for c in stored]
    np.testing.assert_allclose([r["top"][0]["probability"] for r in predicted], top, atol=2e-3)
    # A pooled head on the same cache: its pooled features serve logreg without another extraction.
    assert run_cli("fit", *common, "--head", "logreg").exit_code == 0
    assert_one_line_error(run_cli("fit", *common, "--head", "attentive", "--normalize", "l2"), "layer-norms")


def test_attentive_streams_a_token_cache_larger_than_its_memory_cap(tmp_path):
    data = copy_sample(tmp_path / "data", 40, 2)
    cache = extract(model="timm:test_vit", weights="none", dataset=f"folder:{data}", resolution=64, tokens=True,
                    token_dtype="float32", cache_dir=str(tmp_path / "cache"), progress=False).path
    from probe.device import resident_bytes

    cap = resident_bytes() + (4 << 20)  # the 400 training images' tokens are 1.6 MB: three copies would not fit
    m = fit(head="attentive", features=str(cache), epochs=1, max_memory=cap, out=str(tmp_path / "run")).metrics
    assert m["streamed"] and m["n_train_rows"] == 400 and m["test_accuracy"] > 0


def test_cell_labels_take_each_cells_most_frequent_class():
    mask = np.full((4, 6), IGNORE, np.int16)
    mask[:2, :3] = 1
    mask[0, 0] = 2
    mask[2:, 3:] = 0
    cells = cell_labels(mask, 2, 3)
    assert cells.tolist() == [1, IGNORE, IGNORE, 0]


@pytest.mark.parametrize("name", ["ade20k", "voc2012_seg", "cityscapes", "folder-seg"])
def test_segmentation_layouts_read_as_published(name, tmp_path):
    import torchvision.datasets as tvd

    root = tmp_path / "data"
    expected = getattr(layouts, name.replace("-", "_"))(root if name != "folder-seg" else root / "fs")
    data = load_dataset(f"folder-seg:{root / 'fs'}" if name == "folder-seg" else name, root, download=False)
    assert data.classes[:3] == expected["classes"][:3]
    assert (len(data.splits["train"]), len(data.splits["test"])) == (expected["train"], expected["test"])
    mask = data.masks["test"].read(0)
    if name == "voc2012_seg":  # torchvision's own reader of the layout, its palette indices, 255 the border
        ref = np.array(tvd.VOCSegmentation(str(root), year="2012", image_set="val")[0][1]).astype(np.int16)
        ref[ref == 255] = IGNORE
    elif name == "cityscapes":  # torchvision's label ids, mapped by its own table to train ids
        ids = np.array(tvd.Cityscapes(str(root / "cityscapes"), split="val", target_type="semantic")[0][1])
        train_id = {c.id: c.train_id for c in tvd.Cityscapes.classes}
        ref = np.vectorize(lambda v: train_id[v] if train_id[v] not in (255, -1) else IGNORE)(ids).astype(np.int16)
        assert data.classes[0] == "road" and len(data.classes) == 19
    else:
        _, scene = layouts.seg_scene(1000, mask.shape)
        ref = (scene - 1 if name == "ade20k" else scene).astype(np.int16)  # ADE: 0 is "other", ignored
        if name == "ade20k":
            ref[scene == 0] = IGNORE
            assert len(data.classes) == 150
        else:
            ref[:, :2] = IGNORE
    np.testing.assert_array_equal(mask, ref)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """folder-seg fixture -> token cache of a tiny random ViT -> seg-linear run, through the CLI's functions."""
    tmp = tmp_path_factory.mktemp("seg")
    layouts.folder_seg(tmp / "fs", 24, 6)
    cache = extract(model="timm:test_vit", weights="none", dataset=f"folder-seg:{tmp / 'fs'}", tokens=True,
                    token_dtype="float32", cache_dir=str(tmp / "cache"), progress=False).path
    result = fit(head="seg-linear", model="timm:test_vit", weights="none", dataset=f"folder-seg:{tmp / 'fs'}",
                 cache_dir=str(tmp / "cache"), runs_dir=str(tmp / "runs"))
    return tmp, open_cache(cache), result


def test_seg_linear_logits_equal_the_backbone_and_head_run_directly(seg_run):
    from PIL import Image

    from probe import segment
    from probe.runs import load_head

    tmp, cache, result = seg_run
    head = load_head(result.out)["pipeline"]
    image = np.array(Image.open(sorted((tmp / "fs" / "test" / "images").glob("*.png"))[0]))
    # The reference: squash the whole image to 160 px, timm's forward_features, the patch grid, then batch norm
    # (its running statistics) and the linear layer as a 1x1 convolution, upsampled to the image.
    net = create_backbone("timm:test_vit", "none").model
    pre = Preprocess.from_dict(cache.key["preprocessing"], 160)
    assert (pre.mode, pre.resize, pre.size) == ("squash", 160, 160)
    x = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(160, 160),
                                        mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    x = (x / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens = net.forward_features(x)[:, net.num_prefix_tokens:]
        grid = tokens.transpose(1, 2).reshape(1, -1, 10, 10)
        bn, linear = head.module_[0], head.module_[1]
        normed = torch.nn.functional.batch_norm(grid, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        reference = torch.nn.functional.conv2d(normed, linear.weight[:, :, None, None], linear.bias)
    with h5py.File(cache.path) as f:
        cached = segment.logits(head, f["test/tokens"][:1], cache.token_shape)
    torch.testing.assert_close(cached, reference, atol=1e-3, rtol=1e-3)
    expected = np.asarray(head.classes_)[torch.nn.functional.interpolate(
        reference, size=image.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0).numpy()]
    np.testing.assert_array_equal(segment.label_map(head, cached[0], image.shape[:2]), expected)


def test_seg_linear_miou_equals_a_confusion_matrix_count(seg_run):
    from sklearn.metrics import confusion_matrix

    from probe import segment
    from probe.runs import load_head

    tmp, cache, result = seg_run
    m, head = result.metrics, load_head(result.out)["pipeline"]
    assert m["task"] == "segmentation" and m["n_test"] == 6 and m["mean_iou"] > 0.5  # colours are separable
    truth, predicted = [], []
    with h5py.File(cache.path) as f:
        for i in range(6):
            shape = f["test/mask_shapes"][i]
            mask = f["test/full_masks"][i].reshape(shape)
            pred = segment.label_map(head, segment.logits(head, f["test/tokens"][i:i + 1], cache.token_shape)[0], shape)
            truth.append(mask[mask != IGNORE])
            predicted.append(pred[mask != IGNORE])
    cm = confusion_matrix(np.concatenate(truth), np.concatenate(predicted), labels=range(4))
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    assert m["mean_iou"] == pytest.approx((np.diag(cm)[union > 0] / union[union > 0]).mean())
    assert m["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    lo, hi = m["intervals"]["mean_iou"]
    assert lo <= m["mean_iou"] <= hi and lo < hi


def test_predict_masks_writes_a_colored_mask_of_the_images_size(seg_run, run_cli):
    from PIL import Image

    tmp, cache, result = seg_run
    image = sorted((tmp / "fs" / "test" / "images").glob("*.png"))[1]
    out = run_cli("predict", "--head", result.out, image, "--masks", tmp / "masks")
    assert out.exit_code == 0, out.output
    mask = Image.open(tmp / "masks" / image.name)
    assert mask.mode == "P" and mask.size == Image.open(image).size
    truth = np.array(Image.open(tmp / "fs" / "test" / "masks" / image.name))
    valid = truth != 255
    assert (np.array(mask)[valid] == truth[valid]).mean() > 0.7
    assert_one_line_error(run_cli("predict", "--head", result.out, image), "--masks")


def test_segmentation_sets_need_tokens_and_their_own_head(seg_run, run_cli):
    tmp, cache, _ = seg_run
    common = ["--model", "timm:test_vit", "--weights", "none", "--dataset", f"folder-seg:{tmp / 'fs'}"]
    assert_one_line_error(run_cli("extract", *common, "--cache-dir", tmp / "c2"), "--tokens")
    assert_one_line_error(run_cli("fit", "--features", cache.path, "--head", "logreg"), "seg-linear")
    assert_one_line_error(run_cli("fit", "--features", cache.path, "--head", "seg-linear", "--C", 1), "--C")


def test_what_a_new_user_broke(tmp_path, run_cli, seg_run):
    """The break-test's findings, each as it was reproduced."""
    import shutil
    from PIL import Image

    # A VOC/ADE mask value past the classes: refused before the pass, nothing written (it spilled into the next cell).
    layouts.ade20k(tmp_path / "ade")
    bad = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png"
    m = np.array(Image.open(bad))
    m[:10, :10] = 200
    Image.fromarray(m).save(bad)
    common = ["--model", "timm:test_vit", "--weights", "none", "--resolution", 64, "--tokens"]
    assert_one_line_error(run_cli("extract", *common, "--dataset", "ade20k", "--data-dir", tmp_path / "ade",
                                  "--cache-dir", tmp_path / "c1"), "holds value 200")
    assert not list((tmp_path / "c1").glob("*.h5*"))
    # A mask of another size than its image: refused before the pass.
    layouts.folder_seg(tmp_path / "fs", 4, 2)
    small = tmp_path / "fs" / "test" / "masks" / "scene001.png"
    Image.open(small).resize((20, 20), Image.NEAREST).save(small)
    assert_one_line_error(run_cli("extract", *common, "--dataset", f"folder-seg:{tmp_path / 'fs'}",
                                  "--cache-dir", tmp_path / "c2"), "must match its image")
    assert not list((tmp_path / "c2").glob("*.h5*"))
    # Token values past float16's range: refused, not stored as inf.
    import timm

    net = timm.create_model("test_vit")
    state = net.state_dict()
    state["norm.weight"] *= 1e5
    torch.save(state, tmp_path / "big.pth")
    data = copy_sample(tmp_path / "d", 1, 1)
    assert_one_line_error(run_cli("extract", "--model", "timm:test_vit", "--weights", tmp_path / "big.pth",
                                  "--resolution", 64, "--dataset", f"folder:{data}", "--tokens",
                                  "--cache-dir", tmp_path / "c3"), "--token-dtype float32")
    # A token cache with --layers serves fit's pooled, layer and token heads alike.
    args = ["--model", "timm:test_vit", "--weights", "none", "--resolution", 64, "--dataset", f"folder:{data}",
            "--cache-dir", tmp_path / "c4"]
    assert run_cli("extract", *args, "--tokens", "--layers", "all").exit_code == 0
    for head in (["--head", "attentive", "--epochs", 1], ["--head", "logreg"], ["--head", "logreg", "--layer", "last4"]):
        result = run_cli("fit", *args, *head)
        assert result.exit_code == 0, (head, result.output)
    # The suite refuses heads on token maps up front; two images of one name cannot share a mask file.
    assert_one_line_error(run_cli("suite", "--models", "timm:test_vit", "--datasets", "sample", "--head", "attentive"),
                          "token maps")
    _, _, result = seg_run
    image = sorted((seg_run[0] / "fs" / "test" / "images").glob("*.png"))[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(image, tmp_path / "a" / "x.png")
    shutil.copy(image, tmp_path / "b" / "x.png")
    assert_one_line_error(run_cli("predict", "--head", result.out, tmp_path / "a" / "x.png", tmp_path / "b" / "x.png",
                                  "--masks", tmp_path / "m"), "x.png")


def test_a_killed_token_extraction_resumes_to_the_same_file(tmp_path):
    """A segmentation set's token cache (token shards beside the feature shards, masks at assembly) killed
    twice mid-pass: the run that finishes it writes what one straight run writes, bit for bit."""
    layouts.folder_seg(tmp_path / "fs", 12, 4)
    options = dict(model="timm:test_vit", weights="none", resolution=64, dataset=f"folder-seg:{tmp_path / 'fs'}",
                   tokens=True, batch_size=2, device="cpu")
    reference = extract(**options, cache_dir=str(tmp_path / "ref"), progress=False).path
    cache_dir = tmp_path / "cache"
    args = ["--model", "timm:test_vit", "--weights", "none", "--resolution", "64", "--dataset", options["dataset"],
            "--tokens", "--batch-size", "2", "--device", "cpu"]
    for kill_after in (3, 8):  # a shard after every batch: its tokens first, then its features
        kill_extract_after_shards(args, cache_dir, kill_after)
        assert not list(cache_dir.glob("*.h5")), "a killed run must not leave a file that looks complete"
    result = extract(**options, cache_dir=str(cache_dir), progress=False)
    assert 0 < result.images < 16 and not list(cache_dir.glob("*.parts"))  # it resumed
    with h5py.File(result.path) as got, h5py.File(reference) as want:
        for name in ("train/features", "train/tokens", "train/masks", "test/features", "test/tokens", "test/masks",
                     "test/mask_shapes"):
            np.testing.assert_array_equal(got[name][...], want[name][...], err_msg=name)
        for i in range(4):
            np.testing.assert_array_equal(got["test/full_masks"][i], want["test/full_masks"][i])
