"""Below every stage: which device to run on, and what to say when it runs out of memory."""

from __future__ import annotations

import re

import torch

from probe.errors import ProbeError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ProbeError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or MemoryError.

    A DataLoader worker's failure reaches the main process as a RuntimeError quoting the original.
    """
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def out_of_memory_error(e: BaseException, what: str, fix: str) -> ProbeError:
    """One line naming what ran out, how much it asked for (when the allocator says) and what to lower."""
    asked = re.search(r"tried to allocate (\d+(?:\.\d+)?) ?([KMGT]i?B|bytes)", str(e))
    amount = ""
    if asked:
        number, unit = float(asked[1]), asked[2]
        if unit == "bytes":
            amount = f": it needed {format_bytes(number)} more"
        else:
            amount = f": it needed {number:g} {unit} more"
    return ProbeError(f"out of memory {what}{amount}; {fix}")


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
