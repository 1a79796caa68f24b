"""A process's place in a ``torchrun`` launch, shared by `fp4sim report` and `fp4sim check`.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; without them a
command runs in one process (``World()``). ``process_group`` forms the torch.distributed
group (NCCL when the ranks' own tensors live on CUDA, each rank on GPU ``LOCAL_RANK``; gloo
otherwise), ``share_exit_code`` gives every rank rank 0's exit code (torchrun judges a run by
its ranks' codes), and ``own_gpu_only`` narrows ``CUDA_VISIBLE_DEVICES`` so that the kernel
worker processes a rank starts (``fp4sim.harness.KernelWorker``) see its GPU alone.

Torch is imported only inside the functions that form or use the group, so the rank
helpers load with NumPy alone (``fp4sim check --help`` reads the world from the environment).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

# How long a rank other than 0 waits before leaving with a non-zero code (share_exit_code).
LEADER_FIRST_SECONDS = 2.0

__all__ = ["World", "own_gpu_only", "process_group", "share_exit_code", "visible_gpu",
           "world_from_env"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The process's place in a torchrun launch (one process when not launched so)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(world: World, device: str, *, backend: str | None = None,
                  timeout: datetime.timedelta | None = None) -> Iterator[None]:
    """Initialise torch.distributed for a multi-process world (nothing for one process).

    ``backend`` defaults to NCCL for ``device`` cuda (each rank on its own GPU) and gloo
    otherwise; ``timeout`` bounds every collective (torch's default when None)."""
    if world.size <= 1:
        yield
        return
    # lazy: torch is an extra; the harness loads with NumPy alone
    import torch
    import torch.distributed as dist

    chosen = backend or ("nccl" if device == "cuda" else "gloo")
    if chosen == "nccl":
        torch.cuda.set_device(world.local_rank)  # each rank on its own GPU
    extra = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=chosen, **extra)
    try:
        yield
    finally:
        dist.destroy_process_group()


def share_exit_code(world: World, code: int) -> int:
    """Rank 0's exit code on every rank (torchrun reports the run by its ranks' codes)."""
    if world.size <= 1:
        return code
    # lazy: torch is an extra; the harness loads with NumPy alone
    import torch.distributed as dist

    box = [code if world.leader else 0]
    dist.broadcast_object_list(box, src=0)
    # torchrun stops (SIGTERM) the other ranks as soon as one exits non-zero and names that
    # one the root cause: every rank gets the code first (barrier), and rank 0, which
    # printed the verdict, gets the time to leave first
    dist.barrier()
    code = int(box[0])
    if code and not world.leader:
        time.sleep(LEADER_FIRST_SECONDS)
    return code


def visible_gpu(local_rank: int, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that leaves local rank ``local_rank`` its own GPU:
    the ``local_rank``-th entry of ``visible`` (all GPUs when None or empty)."""
    if not visible:
        return str(local_rank)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if local_rank >= len(entries):
        raise ValueError(f"local rank {local_rank} has no GPU: CUDA_VISIBLE_DEVICES={visible!r}"
                         f" lists {len(entries)}")
    return entries[local_rank]


def own_gpu_only(world: World, environ: MutableMapping[str, str] | None = None) -> None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to this rank's GPU (``LOCAL_RANK``), for this process
    and the children it starts, which then address it as ``cuda``. Call it before anything
    touches CUDA (CUDA reads the variable once, when it initialises)."""
    if world.size <= 1:
        return
    env = os.environ if environ is None else environ
    env["CUDA_VISIBLE_DEVICES"] = visible_gpu(world.local_rank, env.get("CUDA_VISIBLE_DEVICES"))
