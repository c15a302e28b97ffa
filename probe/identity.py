"""What makes two artifacts the same: one identity, computed here, stored inside the artifact, and
compared in full on every reuse.

An identity is a JSON object holding the complete specification of everything that can change an
artifact's numbers: for a feature cache its key (the data set's content fingerprint and split
protocol, the model, the weights' identity, the preprocessing, pool, layers, views, precision and
storage dtype), for a fit the cache's key plus the head with all its hyperparameters and every
option of the selection (classes, train-per-class, seed, test fraction, views, layer), for a fine-tune
its whole configuration with the data set's fingerprint. Folder and file names stay readable, and end
in the identity's digest so that two specifications never share one; but a reuse (`probe depth`,
`probe suite`, `compare --pivot`, `fit` finding a cache, a head finding its cache, `finetune --resume`)
compares the identity stored in the artifact with the one wanted, never a name or a subset of fields.

Where two artifacts differ, `differences` names the fields, so a table can label two rows by what
separates them instead of silently keeping one.
"""

from __future__ import annotations

import hashlib
import json


def canonical(spec: dict) -> str:
    """The identity as one JSON text: keys sorted, tuples as lists, no NaN."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_plain)


def _plain(value):
    """numpy scalars and arrays, paths: their plain JSON form."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def digest(spec: dict, length: int = 16) -> str:
    """A short hash of the identity, for file and folder names (the stored identity is what is compared)."""
    return hashlib.sha256(canonical(spec).encode()).hexdigest()[:length]


def same(a: dict | None, b: dict | None) -> bool:
    """Whether two identities are equal in every field (None, an artifact without one, equals nothing)."""
    return a is not None and b is not None and canonical(a) == canonical(b)


def normalized(spec: dict) -> dict:
    """The identity as it reads back from a JSON file (tuples become lists), for storing beside others."""
    return json.loads(canonical(spec))


def flatten(spec: dict, prefix: str = "") -> dict[str, str]:
    """Nested fields as dotted names with their JSON values: {"cache.resolution": "64", ...}."""
    flat = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = canonical(value) if not isinstance(value, str) else value
    return flat


def differences(specs: list[dict]) -> list[str]:
    """The dotted fields whose values are not the same in all of `specs` (a field one lacks counts)."""
    flats = [flatten(s) for s in specs]
    names = sorted({n for f in flats for n in f})
    return [n for n in names if len({f.get(n, "(absent)") for f in flats}) > 1]


def describe(spec: dict, fields: list[str]) -> str:
    """`field=value, ...` of the named dotted fields of one identity: a row's label in a table."""
    flat = flatten(spec)
    return ", ".join(f"{n.rsplit('.', 1)[-1] if _unique_tail(n, fields) else n}={flat.get(n, '(absent)')}"
                     for n in fields)


def _unique_tail(name: str, fields: list[str]) -> bool:
    tail = name.rsplit(".", 1)[-1]
    return sum(f.rsplit(".", 1)[-1] == tail for f in fields) == 1
