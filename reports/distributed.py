"""Sharding ``fp4sim report`` over the processes of ``torchrun`` (torch.distributed).

    torchrun --nproc-per-node N -m fp4sim report ...            # one node
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT -m fp4sim report ...     # several nodes

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; without them the
report runs in one process. Each rank computes its share of the units (scenario × recipe,
``reports.runner.Unit``), assigned by cost (largest first to the least-loaded rank, a
deterministic greedy schedule); rank 0 gathers the unit results, merges them in the
report's order and analyses and validates it; the case figures (most of the rendering time)
are then rendered by every rank for a share of the cases, and rank 0 builds and writes the
one report. Every unit seeds its own
generators and runs with one CPU thread, so the numbers do not depend on the rank that
computed them: the report equals the single-process one in every number but the timings.

Backend: NCCL when the report runs on CUDA (each rank on GPU ``LOCAL_RANK``), gloo on the
CPU. Results travel as pickled objects (``gather_object``), a few MB per report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fp4sim.reports.document import CaseFigures, case_figures
from fp4sim.reports.runner import Computed, ReportConfig, Unit, UnitResult, merge, run_units, units


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
def process_group(world: World, device: str) -> Iterator[None]:
    """Initialise torch.distributed for a multi-process world (nothing for one process)."""
    if world.size <= 1:
        yield
        return
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)  # each rank on its own GPU
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def assign(work: Sequence[Unit], ranks: int) -> list[list[Unit]]:
    """Longest-processing-time greedy schedule: units by decreasing cost, each to the rank
    with the least cost so far (ties to the lower rank); each rank's units in report order."""
    loads = [0.0] * ranks
    shares: list[list[Unit]] = [[] for _ in range(ranks)]
    for unit in sorted(work, key=lambda u: (-u.cost, u.index)):
        r = min(range(ranks), key=lambda i: (loads[i], i))
        loads[r] += unit.cost
        shares[r].append(unit)
    return [sorted(share, key=lambda u: u.index) for share in shares]


def compute_sharded(
    config: ReportConfig, world: World, progress: Callable[[str], None]
) -> Computed | None:
    """This rank's share of the units; rank 0 returns the merged :class:`Computed`, the
    others None (after sending their results)."""
    start = time.perf_counter()
    share = assign(units(config), world.size)[world.rank]
    tag = f"rank {world.rank}/{world.size} "
    progress(f"fp4sim report: {tag}computes {len(share)} of {len(units(config))} units")
    results = run_units(config, share, progress, tag=tag)
    mine = time.perf_counter() - start
    gathered: list[tuple[list[UnitResult], float]] | None = (
        [([], 0.0)] * world.size if world.leader else None
    )
    dist.gather_object((results, mine), gathered, dst=0)
    if not world.leader:
        return None
    assert gathered is not None
    everything = [r for rs, _ in gathered for r in rs]
    computed = merge(config, everything, time.perf_counter() - start)
    computed.ranks = world.size
    computed.rank_seconds = [round(seconds, 3) for _, seconds in gathered]
    # the transfer and merge after the slowest rank finished (ranks start together)
    slowest = max(seconds for _, seconds in gathered)
    computed.gather_seconds = round(max(0.0, time.perf_counter() - start - slowest), 3)
    return computed


def share_exit_code(world: World, code: int) -> int:
    """Rank 0's exit code on every rank (torchrun reports the run by its ranks' codes)."""
    if world.size <= 1:
        return code
    box = [code if world.leader else 0]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def render_shared(world: World, report: dict[str, Any] | None) -> dict[int, CaseFigures] | None:
    """Every rank renders the figures of the cases ``i`` with ``i % size == rank`` of rank 0's
    validated ``report`` (broadcast); rank 0 returns them all, the others None."""
    box = [report if world.leader else None]
    dist.broadcast_object_list(box, src=0)
    shared = box[0]
    assert shared is not None
    mine = {
        i: case_figures(case)
        for i, case in enumerate(shared["cases"])
        if i % world.size == world.rank
    }
    gathered: list[dict[int, CaseFigures]] | None = (
        [{} for _ in range(world.size)] if world.leader else None
    )
    dist.gather_object(mine, gathered, dst=0)
    if not world.leader:
        return None
    assert gathered is not None
    return {i: pngs for part in gathered for i, pngs in part.items()}
