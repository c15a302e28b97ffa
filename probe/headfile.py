"""A fitted head on disk without pickle: `head.json` and `head.npz`, which load without running code.

A pickle (joblib's head.joblib of probe 0.4 and older) runs whatever code it names when it is opened,
so a head someone sent could do anything; scikit-learn's and joblib's documentation warn of it. This
format stores the same artifact as data only:
- head.json: every value that is not an array, as JSON. An estimator (the pipeline, its scaler and the
  head) is its class, which must be on the list below, with its parameters and fitted attributes; a
  torch head's module is its state dict, rebuilt by the head's own `_module`.
- head.npz: every array, read with numpy's `allow_pickle=False`, so no object array can hold code.
Loading builds only the classes of TRUSTED, sets their attributes, and checks the arrays' file by its
SHA-256 recorded in head.json (the two files are one head, written npz first, json last).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from probe.errors import ProbeError

FORMAT = 2
# The only classes a head file may name: what probe fit's pipelines hold.
TRUSTED = ("sklearn.pipeline.Pipeline", "sklearn.preprocessing._data.StandardScaler",
           "sklearn.preprocessing._data.Normalizer", "probe.heads.LogisticProbe", "probe.heads.TorchLinear",
           "probe.heads.TorchMLP", "probe.heads.AttentiveProbe", "probe.heads.SegLinearProbe", "probe.heads.CosineKNN", "probe.heads.ZeroShotHead", "probe.rows.Rows",
           "probe.rows.Part")


class _Encoder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, a: np.ndarray) -> dict:
        if a.dtype == object:
            raise ProbeError("a head holds an array of Python objects, which the safe head format cannot store")
        name = f"a{len(self.arrays)}"
        self.arrays[name] = a
        return {"__array__": name}

    def __call__(self, value):
        torch = sys.modules.get("torch")  # a tensor exists only where torch is loaded: a logreg fit does not load it

        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            return float(value) if np.isfinite(value) else {"__float__": str(float(value))}
        if isinstance(value, np.ndarray):
            return self.array(value)
        if torch is not None and isinstance(value, torch.Tensor):
            return {"__tensor__": self.array(value.detach().cpu().numpy())["__array__"]}
        if isinstance(value, Path):
            return {"__path__": str(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [self(v) for v in value]}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self(v) for k, v in value.items()}
            return {"__items__": [[self(k), self(v)] for k, v in value.items()]}
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if name not in TRUSTED:
            raise ProbeError(f"a head holds a {name}, which the safe head format cannot store")
        state = value.__getstate__() if hasattr(value, "__getstate__") else dict(value.__dict__)
        state = dict(state if isinstance(state, dict) else value.__dict__)
        module = state.pop("module_", None)  # a torch head's trained module: its state dict
        encoded = {"__object__": name, "state": self(state)}
        if module is not None:
            encoded["module_state"] = self({k: v for k, v in module.state_dict().items()})
        return encoded


def _decode(value, arrays):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__array__" in value:
        return arrays[value["__array__"]]
    if "__tensor__" in value:
        import torch

        return torch.from_numpy(np.array(arrays[value["__tensor__"]]))
    if "__float__" in value:
        return float(value["__float__"])
    if "__path__" in value:
        return Path(value["__path__"])
    if "__tuple__" in value:
        return tuple(_decode(v, arrays) for v in value["__tuple__"])
    if "__items__" in value:
        return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in value["__items__"]}
    if "__object__" in value:
        name = value["__object__"]
        if name not in TRUSTED:
            raise ProbeError(f"the head file names class {name}, which is not one a probe head holds; refused")
        module_name, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        obj = cls.__new__(cls)
        obj.__dict__.update(_decode(value["state"], arrays))
        if "module_state" in value:  # rebuilt as the head builds it, then its trained weights
            import torch

            module = obj._module(obj.n_features_in_, len(obj.classes_))
            module.load_state_dict({k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v))
                                    for k, v in _decode(value["module_state"], arrays).items()})
            obj.module_ = module.eval()
        return obj
    return {k: _decode(v, arrays) for k, v in value.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def dumps(artifact: dict) -> tuple[bytes, bytes]:
    """(head.json, head.npz) bytes of a head artifact."""
    encode = _Encoder()
    body = encode(artifact)
    buffer = io.BytesIO()
    np.savez(buffer, **encode.arrays)
    arrays = buffer.getvalue()
    text = json.dumps({"format": FORMAT, "arrays_sha256": hashlib.sha256(arrays).hexdigest(), "artifact": body},
                      indent=1, allow_nan=False).encode()
    return text, arrays


def load(folder: Path) -> dict:
    """The artifact of head.json + head.npz in `folder`; a one-line ProbeError if either is damaged."""
    try:
        record = json.loads((folder / "head.json").read_text())
        data = (folder / "head.npz").read_bytes()
    except (OSError, ValueError, RecursionError) as e:
        raise ProbeError(f"cannot read the head in {folder} ({type(e).__name__}); it is damaged: run probe fit again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ProbeError(f"{folder / 'head.json'} is not a probe head of format {FORMAT}; run probe fit again")
    if hashlib.sha256(data).hexdigest() != record.get("arrays_sha256"):
        raise ProbeError(f"{folder / 'head.npz'} is not the arrays {folder / 'head.json'} was written with; run probe fit again")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        return _decode(record["artifact"], arrays)
    except ProbeError:
        raise
    except Exception as e:  # a damaged record: the errors of json, numpy and torch come in many types
        raise ProbeError(f"cannot load the head in {folder} ({type(e).__name__}: {e}); run probe fit again") from None
