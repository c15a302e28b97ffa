"""What every benchmark shares: the machine it ran on and where its JSON result goes."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU model and cores, and the GPU name when there is one."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}
    for package in ("probe", "torch", "torchvision", "timm", "transformers", "open_clip_torch", "scikit-learn", "h5py"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def write_result(name: str, result: dict, out: str | os.PathLike | None = None) -> Path:
    """Write {"benchmark", "created", "machine", ...result} as JSON to `out` or results/<name>.json."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), **result}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def small_data_arguments(p) -> None:
    """The options of the small-data experiments: an image folder, the backbone, and how many images."""
    p.add_argument("--data", type=Path, required=True, help="an image folder, e.g. the JPEG CIFAR-10")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="default")
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--train-per-class", type=int, default=300, help="the tutorials' 3,000-image experiment")
    p.add_argument("--test-per-class", type=int, default=None, help="default: the full test split")


def folder_subset(source: Path, dest: Path, per_class: dict[str, int | None | tuple[str, int, int]]) -> Path:
    """An image folder with the first n files of each class of each split (symlinks, nothing copied).

    A value (split, start, stop) takes files start..stop-1 of each class of another split instead,
    e.g. {"train": 300, "test": ("train", 300, 400)}: a validation split held out of the training images.
    """
    for split, n in per_class.items():
        source_split, start, stop = n if isinstance(n, tuple) else (split, 0, n)
        for cls in sorted(p.name for p in (source / source_split).iterdir() if p.is_dir()):
            target = dest / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted((source / source_split / cls).iterdir())[start:stop]:
                link = target / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dest
