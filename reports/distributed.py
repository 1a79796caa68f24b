"""Sharding ``fp4sim report`` over the processes of ``torchrun`` (torch.distributed).

    torchrun --nproc-per-node N -m fp4sim report ...            # one node
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT -m fp4sim report ...     # several nodes

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; without them the
report runs in one process. The work is split into items assigned by cost (largest first to
the least-loaded rank, a deterministic greedy schedule):

* whole units (scenario × recipe, ``reports.runner.Unit``) of the dense scenarios;
* the head parts of the streamed scenarios (``reports.head_parts``: per kv head, the float64
  exact part of each scenario and each recipe's forward and backward variants), so that the
  heads of one large case (the ``--production`` shapes) spread over the ranks.

The head parts then travel to the rank that finishes their case (the streamed units are
spread over the ranks by cost as well): it merges the parts (concatenation along heads) and
computes the case's metrics and kernel cases. Rank 0 gathers the unit results, merges them
in the report's order, and analyses and validates the report; the case figures (most of
the rendering time) are then rendered by every rank for a share of the cases, and rank 0
builds and writes the one report. Every unit seeds its own generators and runs with one CPU
thread, and a head part's shapes do not depend on its rank (the single-process report
computes the same parts in turn), so the report equals the single-process one in every
number but the timings.
A streamed scenario splits into as many parts as it has kv heads (``llm-L131072-decode``,
one kv head, stays whole: its query heads share dK, dV).

Backend: NCCL when the report runs on CUDA (each rank on GPU ``LOCAL_RANK``), gloo on the
CPU. Results travel as pickled objects (``gather_object``): a few MB for the dense
scenarios; a streamed case's head parts carry its tensors (O, every variant's gradients,
the float64 exact ones: about 30 float32 copies of Q per recipe), so the rank finishing a
case needs the memory of the whole case, as in one process.

Multi-node: start the same command on every node with torchrun's rendezvous, e.g. on 2
nodes of 8 GPUs ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:29500 --rdzv-id fp4sim-report -m fp4sim report --device cuda
--production --out DIR`` (HOST: a node every node can reach); rank 0 (on the node that
becomes it) writes DIR.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from fp4sim.harness.ranks import World, process_group, share_exit_code, world_from_env
from fp4sim.reports import head_parts
from fp4sim.reports.document import CaseFigures, case_figures
from fp4sim.reports.head_parts import HeadResult, HeadTask
from fp4sim.reports.runner import (
    Computed,
    ReportConfig,
    Unit,
    UnitResult,
    merge,
    ordered_variants,
    resolved_sm_scale,
    run_unit,
    run_units,
    scenario_tensors_on,
    streamed_tensors,
    units,
)

# the rank helpers live in the comparison base (fp4sim.harness.ranks), shared with check;
# re-exported here for reports.cli
__all__ = ["World", "assign", "compute_sharded", "finish_streamed", "process_group",
           "render_shared", "route_parts", "run_head_tasks", "share_exit_code", "work_items",
           "world_from_env"]

WorkItem = Unit | HeadTask


def assign(work: Sequence[WorkItem], ranks: int) -> list[list[WorkItem]]:
    """Longest-processing-time greedy schedule: items by decreasing cost, each to the rank
    with the least cost so far (ties to the lower rank, then the earlier item); each rank's
    items in the order of ``work``."""
    loads = [0.0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for pos in sorted(range(len(work)), key=lambda i: (-work[i].cost, i)):
        r = min(range(ranks), key=lambda i: (loads[i], i))
        loads[r] += work[pos].cost
        shares[r].append(pos)
    return [[work[i] for i in sorted(share)] for share in shares]


def work_items(config: ReportConfig) -> tuple[list[Unit], list[WorkItem]]:
    """(the units whose reference streams, every work item): whole dense units, then the
    head parts of each streamed scenario (its exact parts and every recipe's)."""
    streamed = [u for u in units(config) if config.streamed(u.scenario)]
    work: list[WorkItem] = [u for u in units(config) if not config.streamed(u.scenario)]
    scenarios = list(dict.fromkeys(u.scenario.name for u in streamed))
    for name in scenarios:
        scenario = next(u.scenario for u in streamed if u.scenario.name == name)
        recipes = [u.recipe for u in streamed if u.scenario.name == name]
        work += head_parts.tasks(scenario, recipes)
    return streamed, work


@contextmanager
def _cpu_threads(config: ReportConfig) -> Iterator[None]:
    """One torch thread on the CPU while computing (as ``runner.run_units``)."""
    threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_head_tasks(config: ReportConfig, tasks: Sequence[HeadTask],
                   progress: Callable[[str], None], tag: str = "") -> list[HeadResult]:
    """This rank's head parts (each scenario's inputs regenerated once, from the seed)."""
    out: list[HeadResult] = []
    inputs: tuple[str, head_parts.Inputs] | None = None
    variants = ordered_variants(config.variants)
    with _cpu_threads(config):
        for n, task in enumerate(tasks, start=1):
            scenario = task.scenario
            if inputs is None or inputs[0] != scenario.name:
                inputs = (scenario.name, scenario_tensors_on(scenario, config.seed,
                                                             config.device))
            result = head_parts.run_task(task, inputs[1], variants, scenario.causal,
                                         resolved_sm_scale(scenario))
            what = "exact" if task.recipe is None else task.recipe
            progress(f"{tag}[part {n}/{len(tasks)}] {scenario.name} x {what} x kv head "
                     f"{task.kv_head}: {result.seconds:.1f} s")
            out.append(result)
    return out


def finish_streamed(config: ReportConfig, streamed: Sequence[Unit],
                    parts: Sequence[HeadResult], progress: Callable[[str], None]
                    ) -> list[UnitResult]:
    """Each of ``streamed`` (this rank's streamed units) from its merged head parts:
    metrics, diagnostics and kernel cases computed here, as in one process."""
    by_key = {p.key: p for p in parts}
    out: list[UnitResult] = []
    cached: tuple[str, Any] | None = None
    variants = ordered_variants(config.variants)
    with _cpu_threads(config):
        for unit in streamed:
            scenario = unit.scenario
            if cached is None or cached[0] != scenario.name:
                inputs = scenario_tensors_on(scenario, config.seed, config.device)
                exact = head_parts.merge_exact(by_key, scenario, config.device)
                cached = (scenario.name, streamed_tensors(inputs, exact))
            tensors = cached[1]
            reference = head_parts.merge_recipe(
                by_key, scenario, unit.recipe, (tensors.q, tensors.k, tensors.v, tensors.do),
                variants)
            result = run_unit(unit, config, tensors, progress=progress,
                              label="[merged head parts]", streamed=reference)
            part_seconds = sum(p.seconds for p in parts
                               if p.key[0] == scenario.name and p.key[1] in (None, unit.recipe))
            result.seconds = round(result.seconds + part_seconds, 3)
            out.append(result)
    return out


def route_parts(world: World, owners: dict[str, int], parts: Sequence[HeadResult]
                ) -> list[HeadResult]:
    """Send each head part to the rank that finishes its units (``owners``: unit key
    'scenario/recipe' -> rank; an exact part goes to every owner of its scenario's units);
    returns the parts this rank receives, its own included."""
    received: list[HeadResult] = []
    for dst in range(world.size):
        mine = [p for p in parts if any(
            rank == dst and key.split("/", 1)[0] == p.key[0]
            and (p.key[1] is None or key == f"{p.key[0]}/{p.key[1]}")
            for key, rank in owners.items())]
        box: list[list[HeadResult]] | None = (
            [[] for _ in range(world.size)] if world.rank == dst else None)
        dist.gather_object(mine, box, dst=dst)
        if box is not None:
            received = [p for share in box for p in share]
    return received


def compute_sharded(
    config: ReportConfig, world: World, progress: Callable[[str], None]
) -> Computed | None:
    """This rank's share of the work; rank 0 returns the merged :class:`Computed`, the
    others None (after sending their results).

    Three steps: every rank computes its dense units and head parts; the head parts travel
    to the rank that finishes their case (streamed units spread over the ranks by cost, so
    that their metrics, the most of a small streamed case's time, run in parallel too); the
    unit results travel to rank 0."""
    start = time.perf_counter()
    streamed, work = work_items(config)
    share = assign(work, world.size)[world.rank]
    my_units = [w for w in share if isinstance(w, Unit)]
    my_parts = [w for w in share if isinstance(w, HeadTask)]
    finishing = assign(streamed, world.size)
    owners = {f"{u.scenario.name}/{u.recipe}": r
              for r, units_of_rank in enumerate(finishing) for u in units_of_rank}
    tag = f"rank {world.rank}/{world.size} "
    progress(f"fp4sim report: {tag}computes {len(my_units)} of "
             f"{sum(isinstance(w, Unit) for w in work)} units and {len(my_parts)} of "
             f"{len(work) - sum(isinstance(w, Unit) for w in work)} head parts, then finishes "
             f"{len(finishing[world.rank])} of {len(streamed)} streamed units")
    results = run_units(config, my_units, progress, tag=tag)
    parts = run_head_tasks(config, my_parts, progress, tag=tag)
    received = route_parts(world, owners, parts)
    mine_units = [u for u in finishing[world.rank] if isinstance(u, Unit)]
    results += finish_streamed(config, mine_units, received, progress)
    mine = time.perf_counter() - start
    gathered: list[tuple[list[UnitResult], float]] | None = (
        [([], 0.0)] * world.size if world.leader else None
    )
    dist.gather_object((results, mine), gathered, dst=0)
    if not world.leader:
        return None
    assert gathered is not None
    slowest = max(seconds for _, seconds in gathered)
    everything = [r for rs, _ in gathered for r in rs]
    computed = merge(config, everything, time.perf_counter() - start)
    computed.ranks = world.size
    computed.rank_seconds = [round(seconds, 3) for _, seconds in gathered]
    # the transfer and merge after the slowest rank finished (ranks start together)
    computed.gather_seconds = round(max(0.0, time.perf_counter() - start - slowest), 3)
    # on the console as well as in report.json's timing: what sharding gained and cost
    progress(f"fp4sim report: compute per rank "
             f"{', '.join(f'{s:.2f} s' for s in computed.rank_seconds)}; gather and merge "
             f"after the slowest rank {computed.gather_seconds:.3f} s")
    return computed


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
