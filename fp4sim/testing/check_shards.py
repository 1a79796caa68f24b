"""`fp4sim check` sharded over the processes of ``torchrun`` (issue 16).

    torchrun --nproc-per-node N -m fp4sim check attention --kernel MODULE:ATTR ...

What is identical to one process with the same seed, and why. With a fixed seed, the cases
Hypothesis draws before the first disagreement do not depend on how the earlier cases were
judged (its generation reacts only to failures), so every rank draws the same list of the
check's distinct cases (``drawn_cases``: what a run in which every case agrees evaluates;
the ranks compare digests of it). Case i is judged (kernel and reference) on rank
i mod N, in rounds of N cases; after each round the ranks learn whether one disagreed, and
the first round with a disagreement is the last. Rank 0 gathers the outcomes of cases
1..i* (i*: the first disagreement; all cases when none) and then

* with no disagreement, applies every outcome in order (as one process would) and reports
  OK over the same number of examples;
* otherwise re-runs the single-process driver (``run_hypothesis``) with the same seed,
  answering cases 1..i* from the gathered outcomes: it reaches the same first failure at
  the same example number, and shrinks and diagnoses it on rank 0 alone (new cases run on
  rank 0's kernel worker).

So the verdict, the example count, the first failing example, the per-case numbers (the
rule's errors and bounds of every judged case) and the accepted conventions are those of
one process; the shrunk case is the one process's too, as long as shrinking finishes within
``--shrink-seconds`` (a time budget, which makes it timing-dependent in one process as well).
Cases after i* that other ranks judged in the last round are discarded.

One caveat, from Hypothesis itself (6.1xx): it also draws constants found in the source of
the local (non site-packages) modules loaded when it draws, so the same seed draws other
cases when other local modules are loaded. The sharded path imports the same modules as one
process before drawing (the system-property modules only afterwards), and rank 0 says so in
a progress line if its replay ever draws a case the ranks did not.

The ranks exchange small Python objects only (gloo, also with ``--device cuda``): the
reference runs on the CPU and only the kernel worker uses the GPU, each rank's worker on GPU
``LOCAL_RANK`` (``fp4sim.harness.ranks.own_gpu_only``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from fp4sim.harness import UsageError
from fp4sim.harness.ranks import World
from fp4sim.testing.check_driver import PROGRESS_SECONDS, CheckResult, run_hypothesis

__all__ = ["CaseJudge", "Shards", "drawn_cases", "run_check"]


@dataclass
class CaseJudge:
    """How a check judges one drawn case, in two steps so that the kernel runs can be
    sharded: ``judge`` runs the kernel and the reference and returns a picklable outcome
    (no effect on the check's state); ``absorb`` applies an outcome to the check's state and
    returns None (agreement) or the diagnosis; ``failed`` says whether an outcome is a
    disagreement without absorbing it; ``stopped`` is true once no kernel call may run
    (after a time-out or crash: shrinking it could cost a full time-out per try)."""

    judge: Callable[[Any], Any]
    absorb: Callable[[Any, Any], str | None]
    failed: Callable[[Any], bool]
    stopped: Callable[[], bool]

    def evaluate(self, case: Any, known: Any = None, have: bool = False) -> str | None:
        """One case as a single process judges it (``known``: its outcome, already judged)."""
        if self.stopped():
            return None
        outcome = known if have else self.judge(case)
        if isinstance(outcome, _Raised):
            raise outcome.error  # as the judge raised it in one process
        return self.absorb(case, outcome)


@dataclass
class _Raised:
    """A judge that raised on a rank (e.g. a kernel's unusable output, a usage error)."""

    error: BaseException


class Shards:
    """This rank's part in a sharded check (``world``), and the meeting before the drawing:
    every rank reports whether it could start, so that one rank's usage error (or rank 0's
    early verdict on an ``--inputs`` case) reaches all of them before any other collective."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.met = False

    @property
    def leader(self) -> bool:
        return self.world.leader

    def meet(self, problem: str | None = None, *, done: bool = False) -> bool:
        """Every rank's (problem, done); raises ``UsageError`` with the first problem (rank 0's
        first) on every rank; returns False when a rank is done (rank 0 has its verdict)."""
        self.met = True
        box: list[tuple[str | None, bool]] = [(None, False)] * self.world.size
        dist.all_gather_object(box, (problem, done))
        for rank, (message, _) in enumerate(box):
            if message is not None:
                raise UsageError(message if rank == 0 else f"rank {rank}: {message}")
        return not any(d for _, d in box)


def drawn_cases(strategy: Any, *, examples: int, seed: int,
                case_key: Callable[[Any], Any]) -> list[Any]:
    """The distinct cases (by ``case_key``, in order) that ``run_hypothesis`` evaluates with
    this seed when every case agrees, i.e. the cases before the first disagreement of any
    run with this seed."""
    cases: list[Any] = []

    def record(case: Any) -> None:
        cases.append(case)  # run_hypothesis asks only for keys it has not seen

    run_hypothesis(strategy, record, examples=examples, seed=seed, shrink_seconds=0.0,
                   case_key=case_key)
    return cases


def _digest(keys: list[Any]) -> str:
    return hashlib.sha256(repr(keys).encode()).hexdigest()


def run_check(
    strategy: Any,
    case_judge: CaseJudge,
    *,
    examples: int,
    seed: int,
    shrink_seconds: float,
    case_key: Callable[[Any], Any],
    log: Callable[[str], None] | None = None,
    progress_every: int = 10,
    shards: Shards | None = None,
) -> CheckResult | None:
    """``run_hypothesis`` over ``case_judge``: in one process (``shards`` None or one rank),
    or sharded over the ranks (the module's docstring); then rank 0 returns the result and
    the other ranks None."""
    if shards is None or shards.world.size <= 1:
        return run_hypothesis(strategy, case_judge.evaluate, examples=examples, seed=seed,
                              shrink_seconds=shrink_seconds, case_key=case_key, log=log,
                              progress_every=progress_every)
    world = shards.world
    cases = drawn_cases(strategy, examples=examples, seed=seed, case_key=case_key)
    keys = [case_key(c) for c in cases]
    digests: list[str] = [""] * world.size
    dist.all_gather_object(digests, _digest(keys))
    if len(set(digests)) != 1:  # never seen; it would break the identity with one process
        raise RuntimeError(f"the ranks drew different cases with seed {seed}: {digests}")
    if log is not None:
        log(f"{len(cases)} distinct examples drawn; example i is judged on rank i mod"
            f" {world.size}")
    outcomes: dict[int, Any] = {}
    first: int | None = None
    last_line, done = time.monotonic(), 0
    for start in range(0, len(cases), world.size):
        i = start + world.rank
        mine: int | None = None
        if i < len(cases):
            try:
                outcomes[i] = case_judge.judge(cases[i])
            except Exception as err:  # noqa: BLE001 - raised again on rank 0, as in one process
                outcomes[i] = _Raised(err)
            if isinstance(outcomes[i], _Raised) or case_judge.failed(outcomes[i]):
                mine = i
        # lock step: every rank learns of a disagreement in this round before the next
        found: list[int | None] = [None] * world.size
        dist.all_gather_object(found, mine)
        done = min(start + world.size, len(cases))
        failing = [f for f in found if f is not None]
        if failing:
            first = min(failing)
            break
        now = time.monotonic()
        if log is not None and (done // progress_every > (done - world.size) // progress_every
                                or now - last_line >= PROGRESS_SECONDS):
            log(f"{done}/{examples} examples checked ({world.size} ranks)")
            last_line = now
    upto = len(cases) if first is None else first + 1
    shares: list[dict[int, Any]] | None = [{} for _ in range(world.size)] if world.leader \
        else None
    dist.gather_object({i: o for i, o in outcomes.items() if i < upto}, shares, dst=0)
    if not world.leader:
        return None
    assert shares is not None
    gathered = {i: o for share in shares for i, o in share.items()}
    assert sorted(gathered) == list(range(upto)), (sorted(gathered), upto)
    if log is not None:
        log(f"gathered the outcomes of examples 1..{upto} from {world.size} ranks")
    if first is None:  # every case agreed: apply the outcomes in order, as one process
        for i, case in enumerate(cases):
            # not an assert: absorbing an outcome updates the check's state (-O keeps it)
            if case_judge.evaluate(case, gathered[i], have=True) is not None:
                raise RuntimeError(f"example {i + 1} disagrees after every rank agreed")
        return CheckResult(ok=True, examples_run=len(cases))
    known = {keys[i]: gathered[i] for i in range(upto)}
    state = {"failed": False, "warned": False}

    def replay(case: Any) -> str | None:
        key = case_key(case)
        if key not in known and not state["failed"] and not state["warned"] and log:
            # a draw the ranks did not make: still judged correctly (here), but the run is
            # no longer the one-process run (a local module imported since the drawing)
            log("note: the replay drew a case missing from the ranks' outcomes (judged here);"
                " the first failure may differ from one process's")
            state["warned"] = True
        diagnosis = case_judge.evaluate(case, known.get(key), have=key in known)
        state["failed"] = state["failed"] or diagnosis is not None
        return diagnosis

    def quiet_log(line: str) -> None:  # the replay's own count of the judged examples
        if log is not None and not line.endswith("examples checked"):
            log(line)

    return run_hypothesis(strategy, replay, examples=examples, seed=seed,
                          shrink_seconds=shrink_seconds, case_key=case_key, log=quiet_log,
                          progress_every=progress_every)
