"""What extract's options mean before anything runs: the data set loaded (its description and content
fingerprint, no pixels decoded), the model resolved, and from both the cache key (probe.cache.cache_key),
the whole identity of the features those options give. `probe extract` writes the file of that key;
`probe fit` finds it by the same options. Nothing here needs torch for the short and timm: model
names already resolved once (probe.backbones keeps their specification in the memo)."""

from __future__ import annotations

from probe.backbones import create_backbone, resolve, select_layers
from probe.augment import AUGMENTATIONS, recipe
from probe.cache import cache_key, cache_path
from probe.datasets import load_dataset
from probe.device import device_type
from probe.errors import ProbeError
from probe.preprocess import dense_preprocess

DTYPES = ("float32", "float16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device) -> str:
    """The forward pass's arithmetic on `device` (auto, cpu, cuda or a torch.device): auto is float16
    autocast on CUDA, float32 on the CPU."""
    if precision not in PRECISIONS:
        raise ProbeError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kind = getattr(device, "type", None) or device_type(device)
    return ("fp16" if kind == "cuda" else "fp32") if precision == "auto" else precision


def resolve_cache(*, model: str = "resnet18", dataset: str = "cifar10", weights: str = "default",
                  resolution: int | None = None, dtype: str = "float32", data_dir: str = "data",
                  cache_dir: str = "cache", download: bool = True, views: int = 0, augment: str = "rrc",
                  pool: str | None = None, layers: str | list[str] | None = None, data_options: dict | None = None,
                  precision: str = "auto", compile: bool = False, device: str = "auto", tokens: bool = False,
                  token_grid: int | None = None, token_dtype: str = "float16"):
    """Load the data set and work out the cache file its features belong in: (dataset, key, path).

    The key is the cache's whole identity (probe.cache.cache_key). data_options: what some data set
    sources read (image_column, label_column of hf:; test_shards, class_names of wds:). tokens: the
    cache also holds the final token maps (token_grid: average-pooled to that side; token_dtype: their
    storage)."""
    spec = resolve(model)
    pre, pool = spec.preprocess.at(resolution), spec.resolve_pool(pool)
    if layers:  # the names need the architecture (random init: no download)
        layers = select_layers(create_backbone(model, "none", pre, pool), layers, spec.name)
    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if views < 0 or augment not in AUGMENTATIONS or augment == "none":
        raise ProbeError(f"--views must be 0 or more and --augment one of {', '.join(AUGMENTATIONS[:-1])}, "
                         f"not {views} and {augment!r}")
    precision = resolve_precision(precision, device)
    if token_grid is not None and (not tokens or token_grid < 1):
        raise ProbeError(f"--token-grid {token_grid}: give a positive grid side, with --tokens")
    if tokens and token_dtype not in DTYPES:
        raise ProbeError(f"unknown token dtype {token_dtype!r}: choose one of {', '.join(DTYPES)}")
    if not tokens and token_dtype != "float16":
        raise ProbeError(f"--token-dtype {token_dtype} is the storage of token maps: give --tokens too")
    data = load_dataset(dataset, data_dir=data_dir, download=download, options=data_options)
    if data.masks is not None:  # a segmentation set: the whole image, squashed, so the tokens tile it all
        pre = dense_preprocess(pre)
        if not tokens:
            raise ProbeError(f"{dataset} is a segmentation data set: extract its token maps with --tokens")
        if views:
            raise ProbeError(f"{dataset} is a segmentation data set: its probe trains on token maps, which have no "
                             "augmented views; drop --views")
    key = cache_key(dataset=data.name, fingerprint=data.fingerprint, protocol=data.protocol, model=spec.name,
                    family=spec.family, weights=spec.weights_identity(weights), resolution=pre.size,
                    preprocessing=pre.as_dict(), pool=pool, dtype=dtype, precision=precision, compiled=bool(compile),
                    views=views, augment=recipe(augment) if views else None, layers=layers or None,
                    tokens={"grid": token_grid or 0, "dtype": token_dtype} if tokens else None)
    return data, key, cache_path(cache_dir, key)


def identity_of(*, device: str = "auto", batch_size: int | None = None, num_workers: int | None = None,
                force: bool = False, **options) -> dict:
    """The key a `probe extract` with these options would write (nothing is run): resolve_cache's. The
    options that change no feature (batch size, workers, --force) are taken and left out."""
    return resolve_cache(**options, device=device)[1]
