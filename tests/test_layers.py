"""Every layer in one pass (issue 13): probe extract --layers, probe fit --layer, probe depth, probe layers;
each family's layer path on tiny random models, checked against the family's own intermediate-feature
API (timm forward_intermediates, HF output_hidden_states, open_clip forward_intermediates) or the
torchvision model run by hand."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, copy_sample
from probe.cache import open_cache
from probe.datasets import SAMPLE_DIR
from probe.extract import Embedder, extract
from probe.runs import load_head


def _x(size: int) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255


def _layers_of(model: str, size: int, layers: list[str] | None = None, pool=None):
    """(final, {layer: pooled}) of probe's single pass, and the normalized input it saw."""
    from probe.backbones import resolve

    pre = resolve(model).preprocess.at(size)
    embed = Embedder(model, "none", pre, pool, torch.device("cpu"), layers=layers or "all")
    images = _x(pre.size)
    out = embed(images)
    x = (images - torch.tensor(pre.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255)
    return embed, out, x


def test_torchvision_resnet_stages_are_the_global_average_pool_of_each_stage():
    embed, out, x = _layers_of("resnet18", 64)
    assert embed.layers == ["layer1", "layer2", "layer3", "layer4"]
    assert list(embed.layer_dims.values()) == [64, 128, 256, 512]
    net = embed.net
    with torch.inference_mode():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        expected = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = stage(h)
            expected.append(h.mean((2, 3)))
        final = net(x)
    torch.testing.assert_close(out, torch.cat([final, *expected], 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_resnet"])
def test_timm_layers_match_forward_intermediates(name):
    embed, out, x = _layers_of(f"timm:{name}", 96)
    model = embed.net.model
    with torch.inference_mode():
        # timm's own API: the output of each block (NCHW maps; token models' patch tokens as a map).
        final_map, intermediates = model.forward_intermediates(x, indices=len(embed.layers), norm=False)
    assert len(intermediates) == len(embed.layers)
    d = embed.feature_dim
    offsets = np.cumsum([d, *embed.layer_dims.values()])
    for i, (name_, inter) in enumerate(zip(embed.layers, intermediates)):
        got = out[:, offsets[i]:offsets[i + 1]]
        if getattr(model, "num_prefix_tokens", 0):  # token model: the class token of that block
            continue
        torch.testing.assert_close(got, inter.mean((2, 3)), rtol=1e-4, atol=1e-5, msg=name_)
    if getattr(model, "num_prefix_tokens", 0):
        # The patch tokens' mean of a token model's block equals the mean of timm's intermediate map.
        embed_avg, out_avg, _ = _layers_of(f"timm:{name}", 96, pool="avg")
        offsets = np.cumsum([embed_avg.feature_dim, *embed_avg.layer_dims.values()])
        for i, inter in enumerate(intermediates):
            torch.testing.assert_close(out_avg[:, offsets[i]:offsets[i + 1]], inter.mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_hf_layers_match_output_hidden_states(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, BitImageProcessor

    torch.manual_seed(0)
    folder = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    from probe.backbones import resolve

    pre = resolve(f"hf:{folder}").preprocess
    embed = Embedder(f"hf:{folder}", "default", pre, "cls", torch.device("cpu"), layers="all")
    assert len(embed.layers) == 3 and all(w == 32 for w in embed.layer_dims.values())
    images = _x(pre.size)
    out = embed(images)
    x = (images - torch.tensor(pre.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255)
    with torch.inference_mode():
        hidden = embed.net.model(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings + each layer
    for i in range(3):
        torch.testing.assert_close(out[:, 32 * (i + 1):32 * (i + 2)], hidden[i + 1][:, 0], rtol=1e-4, atol=1e-5)


def test_open_clip_layers_match_forward_intermediates(tmp_path):
    import open_clip

    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": 3, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}}))
    torch.manual_seed(0)
    torch.save(open_clip.create_model(f"local-dir:{folder}", load_weights=False).state_dict(),
               folder / "open_clip_pytorch_model.bin")
    embed, out, x = _layers_of(f"open_clip:local-dir:{folder}", 64, pool="pooled")
    assert embed.layers == ["transformer.resblocks.0", "transformer.resblocks.1", "transformer.resblocks.2"]
    with torch.inference_mode():
        inter = embed.net.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
    for i in range(3):
        torch.testing.assert_close(out[:, 32 * (i + 1):32 * (i + 2)], inter["image_intermediates_prefix"][i][:, 0],
                                   rtol=1e-4, atol=1e-5)


def test_extract_layers_all_stores_each_layer_beside_the_final_feature(tmp_path):
    plain = open_cache(extract(model="resnet18", weights="none", dataset="sample", resolution=32,
                               cache_dir=str(tmp_path), progress=False).path)
    layered = open_cache(extract(model="resnet18", weights="none", dataset="sample", resolution=32, layers="all",
                                 cache_dir=str(tmp_path), progress=False).path)
    assert plain.path != layered.path and layered.key["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert layered.layers == ["layer1", "layer2", "layer3", "layer4"]
    with h5py.File(layered.path) as f:  # the layout README documents; older readers still find train/features
        assert f["train/layers/layer2"].shape == (1000, 128) and f["test/layers/layer4"].shape == (500, 512)
        assert json.loads(f.attrs["layers"]) == layered.layers
    # The final feature is the same with or without layers: one pass serves both.
    np.testing.assert_allclose(layered.load("train")[0], plain.load("train")[0], rtol=1e-5, atol=1e-6)
    X, _ = layered.load("test", "last4")
    assert X.shape == (500, 64 + 128 + 256 + 512)
    # Fewer layers are another key: a new pass, never a mix.
    fewer = extract(model="resnet18", weights="none", dataset="sample", resolution=32, layers="layer2,layer4",
                    cache_dir=str(tmp_path), progress=False)
    assert not fewer.reused and open_cache(fewer.path).layers == ["layer2", "layer4"]


def test_cli_layers_fit_layer_depth_and_predict(run_cli):
    result = run_cli("layers", "--model", "timm:test_vit")
    assert result.exit_code == 0 and "blocks.0" in result.output and "blocks.5" in result.output
    assert run_cli("extract", "--model", "timm:test_vit", "--weights", "none", "--dataset", "sample",
                   "--layers", "all").exit_code == 0
    cache = next(Path("cache").glob("*.h5"))
    fit = run_cli("fit", "--model", "timm:test_vit", "--weights", "none", "--dataset", "sample",
                  "--layer", "blocks.3", "--C", "1", "--json")
    assert fit.exit_code == 0, fit.output
    metrics = json.loads(fit.output[:fit.output.rindex("}") + 1])
    assert metrics["layer"] == "blocks.3" and metrics["feature_dim"] == 64
    head = next(Path("runs").glob("*__logreg__layer-blocks.3__*"))
    image = next((SAMPLE_DIR / "test" / "cat").glob("*.jpg"))
    predicted = run_cli("predict", "--head", head, image, "--json")
    assert predicted.exit_code == 0, predicted.output
    # The head's class on a test image equals its class for that image's cached layer feature.

    from probe.datasets import load_dataset

    artifact = load_head(head)
    row = load_dataset("sample").splits["test"].images.paths.index(str(image))
    Xt, _ = open_cache(cache).load("test", "blocks.3")
    expected = artifact["classes"][int(artifact["pipeline"].predict(Xt[row:row + 1])[0])]
    assert json.loads(predicted.output)[0]["top"][0]["class"] == expected
    depth = run_cli("depth", str(cache), "--train-per-class", "30")
    assert depth.exit_code == 0, depth.output
    result = json.loads(Path("runs/depth/depth.json").read_text())
    points = result["curves"][0]["points"]
    assert [p["layer"] for p in points] == [f"blocks.{i}" for i in range(6)] + ["final"]
    assert Path("runs/depth/depth.png").stat().st_size > 1000
    again = run_cli("depth", str(cache), "--train-per-class", "30")  # every fit reused
    assert again.exit_code == 0 and json.loads(Path("runs/depth/depth.json").read_text()) == result


def test_bad_layer_input_is_one_line(run_cli):
    assert_one_line_error(run_cli("extract", "--model", "resnet18", "--weights", "none", "--dataset", "sample",
                                  "--layers", "layer9"), "unknown layer", "layer4")
    assert not Path("cache").exists() or not any(Path("cache").glob("*.h5*"))
    assert run_cli("extract", "--model", "resnet18", "--weights", "none", "--dataset", "sample",
                   "--resolution", "32").exit_code == 0
    cache = next(Path("cache").glob("*.h5"))
    assert_one_line_error(run_cli("fit", "--features", cache, "--layer", "layer2"), "holds no layers", "--layers")
    data = copy_sample(Path("d"), per_class=6, test_per_class=3, classes=["cat", "dog"])
    small = ["--model", "resnet18", "--weights", "none", "--dataset", f"folder:{data}", "--resolution", "32"]
    assert run_cli("extract", *small, "--layers", "layer2").exit_code == 0
    assert_one_line_error(run_cli("fit", *small, "--layer", "last4"), "holds layer 'last4'", "--layers all")
    assert run_cli("extract", *small, "--layers", "all").exit_code == 0
    fit = run_cli("fit", *small, "--layer", "last4", "--C", "1", "--json")  # the cache of all layers, not layer2's
    assert fit.exit_code == 0 and json.loads(fit.output[:fit.output.rindex("}") + 1])["feature_dim"] == 64 + 128 + 256 + 512
    assert_one_line_error(run_cli("depth", cache), "holds no layers")
