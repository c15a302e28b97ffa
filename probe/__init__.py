"""probe: run a frozen backbone once, cache its features in HDF5, and fit heads on them in seconds."""

from probe.backbones import Preprocess, create_backbone, describe_models, resolve
from probe.cache import FeatureCache, open_cache
from probe.datasets import load_dataset
from probe.errors import ProbeError
from probe.extract import ExtractResult, extract, resolve_cache

__all__ = [
    "Preprocess", "create_backbone", "describe_models", "resolve", "FeatureCache", "open_cache",
    "load_dataset", "ProbeError", "ExtractResult", "extract", "resolve_cache",
]
