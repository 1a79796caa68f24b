"""The Hypothesis driver shared by the quantizer and attention checks: draw, stop at the
first disagreement, shrink within a time budget."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import seed as hypothesis_seed


def hypothesis_blob(err: BaseException) -> str | None:
    """The ``@reproduce_failure(...)`` line Hypothesis attaches to a failure, if any."""
    for note in getattr(err, "__notes__", []) or []:
        found = re.search(r"@reproduce_failure\([^)]*\)", note)
        if found:
            return found.group(0)
    return None


@dataclass
class CheckResult:
    """Outcome of a check run. ``first_failure_at`` counts examples (1-based) up to the first
    disagreement; ``case`` is the shrunk failing case; ``diagnosis`` the printable report;
    ``untested``: what the kernel's spec kept out of the run; ``conventions``: differences of
    convention seen and accepted (with their case counts); ``restarts``: kernel worker
    restarts after a timeout or crash."""

    ok: bool
    examples_run: int
    first_failure_at: int | None = None
    case: Any = None
    diagnosis: str = ""
    causes: list[str] = field(default_factory=list)
    blob: str | None = None
    shrink_seconds: float = 0.0
    untested: list[str] = field(default_factory=list)
    conventions: list[str] = field(default_factory=list)
    restarts: int = 0
    recipe: str | None = None  # attention: the recipe checked against (named or claimed)


# A long check prints a progress line at least this often (seconds), on stderr.
PROGRESS_SECONDS = 10.0


class _Disagreement(AssertionError):
    """Raised inside the Hypothesis test for a real disagreement."""


def run_hypothesis(
    strategy: Any,
    evaluate: Callable[[Any], str | None],
    *,
    examples: int,
    seed: int,
    shrink_seconds: float,
    case_key: Callable[[Any], Any],
    log: Callable[[str], None] | None = None,
    progress_every: int = 10,
    progress_seconds: float = PROGRESS_SECONDS,
) -> CheckResult:
    """Run ``evaluate`` (None = agreement, else a diagnosis) over drawn cases; stop at the
    first disagreement and shrink for at most ``shrink_seconds``.

    ``log`` receives progress lines: every ``progress_every`` examples or
    ``progress_seconds``, whichever comes first, then the first disagreement and the
    shrinking (a long run is never silent for longer than ``progress_seconds`` plus one
    example)."""
    counter = {"calls": 0, "first": None, "t_fail": None, "shrinks": 0}
    clock = {"last": time.monotonic()}

    def progress(line: str, force: bool = False) -> None:
        now = time.monotonic()
        if log is not None and (force or now - clock["last"] >= progress_seconds):
            log(line)
            clock["last"] = now
    failures: dict[Any, str] = {}
    passes: set[Any] = set()
    last: dict[str, Any] = {}

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        print_blob=True,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def property_holds(case: Any) -> None:
        key = case_key(case)
        if key in passes:
            return
        if key in failures:
            diagnosis = failures[key]
        else:
            if counter["first"] is not None:
                spent = time.monotonic() - counter["t_fail"]
                if spent > shrink_seconds:
                    reject()  # shrink budget spent: only known cases from here on
                counter["shrinks"] += 1
                progress(f"shrinking: {counter['shrinks']} smaller cases tried in {spent:.0f} s"
                         f" (budget {shrink_seconds:g} s)")
            else:
                counter["calls"] += 1
            diagnosis = evaluate(case)
            if counter["first"] is None:
                n = counter["calls"]
                progress(f"{n}/{examples} examples checked",
                         force=diagnosis is None and n % progress_every == 0)
            if diagnosis is None:
                passes.add(key)
                return
            if counter["first"] is None:
                counter["first"] = counter["calls"]
                counter["t_fail"] = time.monotonic()
                progress(f"disagreement at example {counter['first']}; shrinking it (at most"
                         f" {shrink_seconds:g} s)", force=True)
            failures[key] = diagnosis
        last["case"], last["diagnosis"] = case, diagnosis
        raise _Disagreement(diagnosis)

    try:
        property_holds()
    except Exception as err:  # _Disagreement, or Hypothesis wrapping it (Flaky, groups)
        if "case" not in last:
            raise
        return CheckResult(
            ok=False,
            examples_run=counter["calls"],
            first_failure_at=counter["first"],
            case=last.get("case"),
            diagnosis=last.get("diagnosis", str(err)),
            blob=hypothesis_blob(err),
            shrink_seconds=time.monotonic() - (counter["t_fail"] or time.monotonic()),
        )
    return CheckResult(ok=True, examples_run=counter["calls"])

