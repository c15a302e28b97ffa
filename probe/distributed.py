"""torch.distributed in one place, below every stage: which rank this is, its rows, and the few
collectives the stages use.

Under torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK with MASTER_ADDR and
MASTER_PORT), `world()` joins the process group once: NCCL when CUDA is there (each rank on
cuda:LOCAL_RANK), gloo on the CPU. Without a launcher it is a world of one, and every function here
is the identity, so a stage reads the same with one process or many: each rank does the
single-process work on its own rows (`rank_rows`), and rank 0 publishes.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

from probe.errors import ProbeError

# torch.distributed is imported where a world of more than one process needs it: a single process
# (every command without torchrun) never loads torch for it.


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def world(device: str = "auto") -> World:
    """This process's place in the job, joining the process group on first call under a launcher."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        _WORLD = World()
        return _WORLD
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Long timeout: ranks wait at the barrier while rank 0 assembles a large HDF5 file.
        timeout = datetime.timedelta(hours=2)
        rank = int(os.environ["RANK"])
        # torchrun's agent serves the store and keeps it across restarts: without a prefix of our own,
        # a restarted group can read the addresses of the attempt that died (pytorch/pytorch#135712,
        # measured here: 4 of 6 restarts failed to connect). Each attempt gets its own keys.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                              is_master=rank == 0 and not agent, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"probe/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{attempt}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank)
    return _WORLD


def close() -> None:
    """Leave the process group (a process exiting with it open aborts in gloo's destructor)."""
    global _WORLD
    dist = sys.modules.get("torch.distributed")  # loaded by world() when there is a group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


def current() -> World:
    """The world if `world()` has joined one, else a world of one (for code below the stages)."""
    return _WORLD or World()


def rank_rows(n: int, w: World | None = None, align: int = 1) -> tuple[int, int]:
    """This rank's contiguous rows [start, stop) of n, as even as `align` allows: every start is a
    multiple of `align` (the batch size, so each rank's batches are the single process's batches)."""
    w = w or current()
    blocks = -(-n // align)
    start = min(n, (blocks * w.rank // w.size) * align)
    stop = min(n, (blocks * (w.rank + 1) // w.size) * align)
    return start, stop


def barrier() -> None:
    if current().size > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce(tensor):
    """Sum `tensor` (a torch tensor or a numpy array) over ranks in place and return it (gloo needs CPU
    tensors, NCCL CUDA ones; the data moves and back)."""
    if current().size > 1:
        import torch
        import torch.distributed as dist

        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        source = torch.from_numpy(tensor) if not isinstance(tensor, torch.Tensor) else tensor
        moved = source.to(backend_device)
        dist.all_reduce(moved)
        if moved is not source:
            source.copy_(moved)
    return tensor


def all_gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order."""
    if current().size == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * current().size
    dist.all_gather_object(out, value)
    return out


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if current().size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared(error: ProbeError) -> ProbeError:
    """Mark an error that every rank holds (it came through a collective): only rank 0 prints it."""
    error.shared = True
    return error


def on_main(compute):
    """compute() on rank 0 only, its result (or its ProbeError, raised on every rank) broadcast to all."""
    if current().size == 1:
        return compute()
    outcome = None
    if current().main:
        try:
            outcome = compute()
        except ProbeError as e:
            outcome = e
    outcome = broadcast(outcome)
    if isinstance(outcome, ProbeError):
        raise shared(outcome)
    return outcome
