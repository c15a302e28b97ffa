"""probe: run a frozen backbone once, cache its features in HDF5, and fit heads on them in seconds.

The names below are imported when first used (`probe.extract` loads torch; `import probe` does not).
"""

import importlib

_NAMES = {
    "Preprocess": "probe.backbones", "create_backbone": "probe.backbones", "describe_models": "probe.backbones",
    "resolve": "probe.backbones", "FeatureCache": "probe.cache", "open_cache": "probe.cache",
    "load_dataset": "probe.datasets", "ProbeError": "probe.errors", "ExtractResult": "probe.extract",
    "extract": "probe.extract", "resolve_cache": "probe.keys",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
