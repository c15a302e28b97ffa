"""timm, Hugging Face transformers and open_clip backbones (issue 9), offline, on tiny random models of
each family: timm's own test_* models, transformers configs saved with save_pretrained, an open_clip
config in an open_clip local-dir folder. Each family's stored feature is checked against the family's
own reference call, and probe's batched tensor preprocessing against the family's own transform on
real images of the bundled sample."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, open_clip_text_folder
from probe.backbones import create_backbone, resolve
from probe.cache import open_cache
from probe.datasets import SAMPLE_DIR
from probe.errors import ProbeError
from probe.preprocess import Preprocess, resize_center_crop

TIMM_MODELS = ["test_vit", "test_resnet", "test_convnext", "test_efficientnet"]
# Tolerances of probe's pixels against each family's own transform (PIL or torchvision resize of an
# 8-bit image against torch's antialiased resize of a float one): the mean absolute difference of
# the normalized input, and the largest relative difference of the features of random-init models.
PIXEL_MEAN_TOLERANCE = 0.01
FEATURE_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random transformers models saved as a user saves one: model and image processor."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config,
                              Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("hf")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    made = {
        # DINOv2's processor: shortest side 256 -> crop 224 bicubic, scaled down to 64 -> 56.
        "dinov2": (Dinov2Model(Dinov2Config(**small, image_size=56, patch_size=14)),
                   BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                     do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225])),
        "vit": (ViTModel(ViTConfig(**small, image_size=64, patch_size=16)), ViTImageProcessor(size={"height": 64, "width": 64})),
        "clip": (CLIPModel(CLIPConfig(vision_config=dict(**small, image_size=64, patch_size=16),
                                      text_config=dict(**small, vocab_size=49408), projection_dim=16)),
                 CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})),
    }
    folders = {}
    for name, (model, processor) in made.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        processor.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory) -> Path:
    """A tiny open_clip model in the folder layout open_clip loads with local-dir: (config + weights)."""
    return open_clip_text_folder(tmp_path_factory.mktemp("open_clip"), image_size=64, vision_layers=2, vocab_size=100)


def _batch(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


# --- the stored feature is the family's own reference call ----------------------------------------

@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_head_feature_is_forward_head_pre_logits(name):
    import timm

    net = create_backbone(f"timm:{name}", "none")
    x = _batch(resolve(f"timm:{name}").preprocess.size)
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    reference.load_state_dict(net.model.state_dict())
    with torch.inference_mode():
        got, expected = net(x), reference.eval().forward_head(reference.forward_features(x), pre_logits=True)
    assert got.shape == (2, net.feature_dim)
    torch.testing.assert_close(got, expected)


def test_timm_token_pools_are_the_class_token_and_the_patch_mean_after_the_final_norm():
    x = _batch(160)
    nets = {pool: create_backbone("timm:test_vit", "none", pool=pool) for pool in ("cls", "avg", "cls+avg")}
    with torch.inference_mode():
        tokens = nets["cls"].model.forward_features(x)  # the final norm is applied in forward_features
        prefix = nets["cls"].model.num_prefix_tokens
        torch.testing.assert_close(nets["cls"](x), tokens[:, 0])
        torch.testing.assert_close(nets["avg"](x), tokens[:, prefix:].mean(1))
        torch.testing.assert_close(nets["cls+avg"](x), torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], 1))
    assert nets["cls+avg"].feature_dim == 2 * nets["cls"].feature_dim
    # DINOv2 models default to cls+avg, their paper's linear-probe feature; other timm models to their head.
    assert resolve("timm:vit_small_patch14_dinov2.lvd142m").pools[0] == "cls+avg"
    assert resolve("timm:test_vit").pools[0] == "head"


def test_hf_features_are_the_documented_outputs(hf_models):
    from transformers import CLIPVisionModel, Dinov2Model, ViTModel

    cases = [("dinov2", Dinov2Model, 56), ("vit", ViTModel, 64), ("clip", CLIPVisionModel, 64)]
    for name, model_class, size in cases:
        reference = model_class.from_pretrained(hf_models[name]).eval()
        x = _batch(size)
        with torch.inference_mode():
            out = reference(pixel_values=x)
            hidden = out.last_hidden_state
            expected = {"pooler": out.pooler_output}
            if name == "clip":  # CLIP's final norm (post_layernorm) is applied to the pooled token only
                hidden = reference.post_layernorm(hidden)
                from transformers import CLIPModel  # proj: the whole model's image embedding in the text space

                projected = CLIPModel.from_pretrained(hf_models[name]).eval().get_image_features(pixel_values=x)
                expected["proj"] = projected if isinstance(projected, torch.Tensor) else projected.pooler_output
            expected.update({"cls": hidden[:, 0], "avg": hidden[:, 1:].mean(1),
                             "cls+avg": torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], 1)})
            for pool in resolve(f"hf:{hf_models[name]}").pools:
                net = create_backbone(f"hf:{hf_models[name]}", "default", pool=pool)
                got = net(x)
                assert got.shape == (2, net.feature_dim), (name, pool)
                torch.testing.assert_close(got, expected[pool], msg=f"{name} {pool}")
    # The default of each: DINOv2 cls+avg, CLIP the pooled image feature before the projection, ViT cls.
    assert [resolve(f"hf:{hf_models[n]}").pools[0] for n in ("dinov2", "clip", "vit")] == ["cls+avg", "pooler", "cls"]


def test_open_clip_features_are_encode_image_and_the_same_before_its_projection(open_clip_folder):
    import open_clip

    reference = open_clip.create_model(f"local-dir:{open_clip_folder}").eval()
    name = f"open_clip:local-dir:{open_clip_folder}"
    x = _batch(64)
    pooled, proj = create_backbone(name, "default", pool="pooled"), create_backbone(name, "default", pool="proj")
    with torch.inference_mode():
        embedding = reference.encode_image(x)
        torch.testing.assert_close(proj(x), embedding)
        # The pre-projection feature, projected with the model's own matrix, is encode_image again.
        torch.testing.assert_close(pooled(x) @ reference.visual.proj, embedding)
    assert (pooled.feature_dim, proj.feature_dim) == (32, 16)
    assert resolve(name).pools == ("pooled", "proj")


# --- probe's pixels against each family's own transform, on real images ---------------------------

def _sample_images(n: int = 12) -> tuple[list[Image.Image], list[Image.Image]]:
    """Real CIFAR-10 images of the sample (32 x 32, upscaled by the transforms) and the same images
    enlarged to a non-square 300 x 220 (downscaled, cropped off-centre by an odd margin)."""
    paths = sorted(glob.glob(str(SAMPLE_DIR / "test" / "*" / "*.jpg")))[::40][:n]
    small = [Image.open(p).convert("RGB") for p in paths]
    return small, [im.resize((300, 220), Image.BICUBIC) for im in small]


def _probe_pixels(pre: Preprocess, image: Image.Image) -> torch.Tensor:
    x = resize_center_crop(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float(), pre)
    return ((x - torch.tensor(pre.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255))[0]


def _assert_same_input(model: str, reference_transform, net) -> None:
    pre = resolve(model).preprocess
    for images in _sample_images():
        ours = torch.stack([_probe_pixels(pre, im) for im in images])
        theirs = torch.stack([reference_transform(im) for im in images])
        assert ours.shape == theirs.shape, model
        assert (ours - theirs).abs().mean() < PIXEL_MEAN_TOLERANCE, model
        with torch.inference_mode():
            a, b = net(ours), net(theirs)
        assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() < FEATURE_TOLERANCE, model


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_timm_preprocessing_matches_timm_create_transform(name):
    from timm.data import create_transform, resolve_data_config

    net = create_backbone(f"timm:{name}", "none")
    _assert_same_input(f"timm:{name}", create_transform(**resolve_data_config({}, model=net.model)), net)


@pytest.mark.parametrize("name,weights", [("resnet18", "ResNet18_Weights"), ("efficientnet_b0", "EfficientNet_B0_Weights"),
                                          ("convnext_tiny", "ConvNeXt_Tiny_Weights")])
def test_torchvision_preprocessing_matches_the_weights_transforms(name, weights):
    import torchvision

    transform = getattr(torchvision.models, weights).IMAGENET1K_V1.transforms()  # resize 256 (236), crop 224
    _assert_same_input(name, transform, create_backbone(name, "none"))


def test_hf_preprocessing_matches_the_image_processor(hf_models):
    from transformers import AutoImageProcessor

    for name, folder in hf_models.items():
        processor = AutoImageProcessor.from_pretrained(folder)
        _assert_same_input(f"hf:{folder}", lambda im: processor(images=im, return_tensors="pt")["pixel_values"][0],
                           create_backbone(f"hf:{folder}", "default"))


def test_open_clip_preprocessing_matches_its_preprocess(open_clip_folder):
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_folder}")
    name = f"open_clip:local-dir:{open_clip_folder}"
    _assert_same_input(name, preprocess, create_backbone(name, "default"))


def _first(pre: Preprocess, n: int = 3) -> tuple:
    return (pre.size, pre.resize, pre.interpolation)[:n]


def test_each_family_resolves_its_own_preprocessing(hf_models):
    assert _first(resolve("resnet18").preprocess) == (224, 256, "bilinear")  # resize 256, crop 224 (not 224 direct)
    assert _first(resolve("efficientnet_b0").preprocess) == (224, 256, "bicubic")
    assert _first(resolve("convnext_tiny").preprocess, 2) == (224, 236)
    assert _first(resolve("timm:test_vit").preprocess) == (160, 168, "bicubic")  # crop_pct 0.95
    dinov2 = resolve(f"hf:{hf_models['dinov2']}").preprocess
    assert (dinov2.size, dinov2.resize, dinov2.interpolation, dinov2.mode) == (56, 64, "bicubic", "shortest")
    vit = resolve(f"hf:{hf_models['vit']}").preprocess
    assert (vit.size, vit.resize, vit.mode, vit.mean) == (64, 64, "squash", (0.5, 0.5, 0.5))
    # --resolution keeps the crop fraction.
    assert _first(resolve("resnet18").preprocess.at(112), 2) == (112, 128)


def test_records_of_probe_0_2_keep_their_transform():
    """Caches and heads written before the model's own preprocessing resized straight to the resolution."""
    old = {"resize": "shorter side, bilinear, antialias; center crop", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.from_dict(old, 96) == Preprocess(96, 96, "bilinear", "shortest", (0.5,) * 3, (0.5,) * 3)


# --- the CLI, offline, on the bundled sample ------------------------------------------------------

def _extract_fit_predict(run_cli, model, *extra):
    result = run_cli("extract", "--model", model, "--weights", "none", "--dataset", "sample", *extra)
    assert result.exit_code == 0, result.output
    path = Path(result.output.split("wrote ")[1].split(":")[0])
    again = run_cli("extract", "--model", model, "--weights", "none", "--dataset", "sample", *extra)
    assert again.exit_code == 0 and "cache hit" in again.output
    fit = run_cli("fit", "--features", path, "--head", "logreg", "--C", "1", "--json")
    assert fit.exit_code == 0, fit.output
    head = next(Path("runs").glob("*/head.json")).parent
    image = next((SAMPLE_DIR / "test" / "cat").glob("*.jpg"))
    predicted = run_cli("predict", "--head", head, image, "--json")
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.output)[0]["top"]) == 5
    return open_cache(path)


def test_timm_model_extract_fit_predict_and_pool_in_the_key(run_cli):
    cache = _extract_fit_predict(run_cli, "timm:test_vit")
    assert cache.key["model"] == "timm:test_vit.r160_in1k" and cache.key["pool"] == "head"
    assert cache.key["preprocessing"]["resize"] == 168 and cache.attrs["family"] == "timm"
    other = run_cli("extract", "--model", "timm:test_vit", "--weights", "none", "--dataset", "sample", "--pool", "cls+avg")
    assert other.exit_code == 0 and "cache hit" not in other.output  # another pool, another file
    assert len(list(Path("cache").glob("*.h5"))) == 2
    assert open_cache(next(Path("cache").glob("*cls-avg*.h5"))).feature_dim == 128


def test_hf_folder_extract_fit_predict(run_cli, hf_models):
    cache = _extract_fit_predict(run_cli, f"hf:{hf_models['dinov2']}")
    assert cache.key["pool"] == "cls+avg" and cache.feature_dim == 64
    assert cache.key["weights"] == "none"


def test_open_clip_extract_fit_predict(run_cli, open_clip_folder):
    cache = _extract_fit_predict(run_cli, f"open_clip:local-dir:{open_clip_folder}", "--pool", "proj")
    assert cache.feature_dim == 16 and cache.key["family"] == "open_clip"


def test_a_saved_folder_is_identified_by_its_content(run_cli, hf_models, tmp_path):
    """Default weights of a saved folder: a re-saved model gives another cache, and predict refuses a
    head whose folder changed."""
    import shutil

    folder = tmp_path / "mine"
    shutil.copytree(hf_models["vit"], folder)
    spec = resolve(f"hf:{folder}")
    before = spec.weights_identity("default")
    assert before.startswith("default-")
    with open(folder / "config.json", "a") as f:
        f.write("\n")
    assert spec.weights_identity("default") != before


@pytest.mark.parametrize("args,words", [
    (["--model", "timm:vit_smal_patch16_224"], ["unknown timm model", "vit_small_patch16_224"]),
    (["--model", "timm:test_vit.nope"], ["no pretrained tag 'nope'", "r160_in1k"]),
    (["--model", "hf:/no/such/folder"], ["Hugging Face model folder", "not found"]),
    (["--model", "open_clip:ViT-B-32/no_such_tag"], ["no pretrained tag", "laion2b_s34b_b79k"]),
    (["--model", "open_clip:ViT-B-33/openai"], ["unknown open_clip architecture", "ViT-B-32"]),
    (["--model", "timm:test_resnet", "--weights", "none", "--pool", "cls"], ["--pool cls", "one feature only"]),
    (["--model", "resnet18", "--weights", "none", "--pool", "avg"], ["--pool avg"]),
    (["--model", "foo:bar"], ["unknown model family"]),
])
def test_bad_model_input_is_one_line_and_writes_nothing(run_cli, args, words):
    assert_one_line_error(run_cli("extract", "--dataset", "sample", *args), *words)
    assert not Path("cache").exists() or not any(Path("cache").iterdir())


def test_weights_of_another_architecture_are_refused_with_their_keys(run_cli, tmp_path, hf_models):
    import timm

    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pt")
    assert_one_line_error(run_cli("extract", "--dataset", "sample", "--model", "timm:test_vit", "--weights",
                                  tmp_path / "resnet.pt"), "does not fit timm:test_vit", "missing keys")
    assert_one_line_error(run_cli("extract", "--dataset", "sample", "--model", f"hf:{hf_models['dinov2']}",
                                  "--weights", hf_models["vit"]), "do not fit")
    assert not any(Path("cache").glob("*.h5*"))


OFFLINE_EXTRACTS = """import json, sys
from click.testing import CliRunner
from probe.cli import main
out = []
for model in sys.argv[1:]:
    r = CliRunner().invoke(main, ["-q", "extract", "--dataset", "sample", "--model", model])
    out.append({"model": model, "exit_code": r.exit_code, "stderr": r.stderr, "output": r.output})
print(json.dumps(out))
"""


def test_offline_default_weights_name_the_ways_out(tmp_path):
    # A fresh process with HF_HUB_OFFLINE=1 in its environment, as a user sets it: huggingface_hub reads
    # it at import. (Without it, this machine has no network either, and the hub client retries ~25 s.)
    models = ["timm:test_vit", "hf:facebook/dinov2-small", "open_clip:ViT-B-32/laion2b_s34b_b79k"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", OFFLINE_EXTRACTS, *models], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for r in json.loads(done.stdout.strip().splitlines()[-1]):
        lines = r["stderr"].strip().splitlines()
        assert r["exit_code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
        assert "HF_HUB_OFFLINE" in lines[0] and "efficientnet_lite0" in lines[0] and "Traceback" not in r["output"], r
    assert not list(tmp_path.rglob("*.h5*"))


@pytest.mark.parametrize("family,extra", [("hf:some/repo", "probe[hf]"), ("open_clip:ViT-B-32/openai", "probe[clip]")])
def test_a_missing_extra_is_one_line_naming_the_pip_command(tmp_path, family, extra):
    """Run as a user without transformers / open_clip: the import is made to fail in a fresh process."""
    library = "transformers" if family.startswith("hf") else "open_clip"
    code = f"import sys; sys.modules[{library!r}] = None; from probe.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "extract", "--dataset", "sample", "--model", family],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f'error: --model {family.split(":")[0]}:... needs {library}: '
                                                f'pip install "{extra}"']


def test_models_search_lists_pretrained_names_of_timm_and_open_clip(run_cli):
    result = run_cli("models", "--search", "dinov2")
    assert result.exit_code == 0
    assert "timm:vit_small_patch14_dinov2.lvd142m" in result.output and " 518" in result.output
    clip = run_cli("models", "--search", "laion2b_s34b_b79k")
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in clip.output and " 768 " in clip.output


def test_partial_fine_tuning_trains_the_last_block_of_any_family(hf_models):
    from probe.finetune import Classifier, set_trainable
    from probe.backbones import partial_prefixes

    net = Classifier(f"hf:{hf_models['vit']}", "default", None, 3)
    set_trainable(net, "partial", partial_prefixes(net.backbone))
    trainable = {n for n, p in net.backbone.named_parameters() if p.requires_grad}
    # The second (last) of the two blocks and the final norm after it; nothing of the first block or
    # of the embeddings (transformers names them encoder.layer.N or layers.N depending on its version).
    assert any(re.search(r"layers?\.1\.", n) for n in trainable) and "model.layernorm.weight" in trainable
    assert not any(re.search(r"layers?\.0\.", n) or "embeddings" in n for n in trainable)
    vit = create_backbone("timm:test_vit", "none")
    assert vit.last_stage[0] == "model.blocks.5."
    with pytest.raises(ProbeError):
        resolve("timm:no_such_model_at_all")


def test_finetune_runs_on_a_timm_model(run_cli):
    result = run_cli("finetune", "--model", "timm:test_vit", "--weights", "none", "--dataset", "sample",
                     "--strategy", "partial", "--epochs", "1", "--train-per-class", "5", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert metrics["method"] == "finetune-partial" and metrics["resolution"] == 160
    full = sum(p.numel() for p in create_backbone("timm:test_vit", "none").parameters())
    assert 0 < metrics["trainable_parameters"] - 10 * (64 + 1) < full  # the last block and the new layer
    assert list(Path("runs").glob("finetune__sample__timm-test_vit__partial__*/metrics.json"))
