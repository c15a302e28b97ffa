"""Below every stage: which device to run on, and what to say when it runs out of memory."""

from __future__ import annotations

import ctypes
import os
import re
import sys

from probe.errors import ProbeError

# torch is imported by the functions that need it: choosing the CPU, and everything else here, does not.


def cuda_available() -> bool:
    """Whether torch can use a CUDA GPU. Without NVIDIA's device files there is none, and torch is not
    imported to find that out (a logreg fit on the CPU never loads it)."""
    if sys.platform == "linux" and not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/nvidia0"):
        return False
    import torch

    return torch.cuda.is_available()


def device_type(device: str = "auto") -> str:
    """'cpu' or 'cuda': what `device` resolves to, as a string (no torch import on a machine without CUDA)."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ProbeError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not cuda_available():
        raise ProbeError("--device cuda, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def resolve_device(device: str = "auto"):
    """The torch.device `device` (auto, cpu or cuda) resolves to."""
    import torch

    return torch.device(device_type(device))


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or MemoryError.

    A DataLoader worker's failure reaches the main process as a RuntimeError quoting the original.
    """
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")  # an error of torch's means torch is loaded
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
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


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere its peak so far)."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel after every batch.

    glibc serves allocations above a threshold (at most 32 MiB by default) with fresh mmap()s and
    unmaps them on free; a forward pass allocates and frees activations of tens of MiB per batch, so
    each batch re-faults every page of them (measured: a third of CPU extraction time in the kernel).
    Raising the mmap threshold to 1 GiB and the trim threshold to its largest value (2 GiB) lets the
    heap reuse that memory: a trim threshold of 1 GiB was measured too low for EfficientNet-Lite0 at
    224 in batches of 64, whose freed peak passes it, so every batch faulted its memory in again. The
    process may keep up to 2 GiB of freed memory in reserve. Linux with glibc only; PROBE_MALLOC=default leaves malloc
    as it is. Returns True if applied. DataLoader workers inherit it (they are forked).
    """
    if sys.platform != "linux" or os.environ.get("PROBE_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
