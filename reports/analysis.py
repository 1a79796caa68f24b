"""The second room of ``fp4sim report``: from computed cases to the report dict.

``analyse`` takes what ``reports.runner`` computed and adds everything derived from it,
once: identities by construction, the ranking against both ground truths, the findings,
the ``--fail-on`` results, the external kernels' verdicts (with their statistics), what
to act on, the analysed tables the figures plot, and the exit code. The result is the
``report.json`` content (``reports.schema``); rendering reads it and computes nothing.

The one step that runs a kernel again, the diagnosis of a kernel's worst disagreeing
case, is handed in as ``diagnose`` by the caller (the runner), so that this module
never reaches back into computation.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import matplotlib
import numpy as np
import torch

from fp4sim.reports import error_statistics, identities, metrics, schema, summary, verdicts
from fp4sim.reports.runner import GROUND_TRUTHS, Computed, ReportConfig
from fp4sim.reports.scenarios import scenario_seed

Diagnose = Callable[[str, str, str], list[str]]
"""(implementation name, scenario name, recipe) -> likely causes of a disagreement."""


def collect_versions() -> dict[str, str | None]:
    def dist_version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "matplotlib": matplotlib.__version__,
        "fp4sim": dist_version("fp4sim"),
        "platform": platform.platform(),
    }


def judge_kernels(
    config: ReportConfig,
    computed: Computed,
    diagnose: Diagnose | None,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The verdict of every external kernel: tolerance-rule tally, a diagnosis of its worst
    disagreeing case, and the statistical comparison of its errors with the recipe's."""
    externals = [i for i in config.implementations if i.kind == "external"]
    out = verdicts.kernel_verdicts(
        computed.cases, [i.to_json() for i in externals], config.recipes
    )
    for verdict in out:
        name = verdict["implementation"]
        worst = verdict["worst"]
        if (
            diagnose is not None
            and not verdict["agrees"]
            and worst is not None
            and worst["status"] == "ok"
        ):
            progress(f"fp4sim report: diagnosing {name} on {worst['scenario']}")
            verdict["causes"] = diagnose(name, worst["scenario"], verdict["recipe"])
        pair = computed.samples.get((name, verdict["recipe"]))
        if pair is not None:
            verdict["statistics"] = error_statistics.distribution_verdict(
                pair["kernel"], pair["reference"]
            )
        verdicts.finish(verdict)
    return out


def analyse(
    config: ReportConfig,
    computed: Computed,
    *,
    diagnose: Diagnose | None = None,
    progress: Callable[[str], None] = lambda _message: None,
) -> dict[str, Any]:
    """The report dict (``reports.schema`` layout) of the computed cases."""
    start = time.perf_counter()
    cases = computed.cases
    order = [s.name for s in config.scenarios]
    scenarios = {
        s.name: {
            **s.to_json(),
            "seed": {"seed": config.seed, "generator_entropy": scenario_seed(config.seed, s.name)},
        }
        for s in config.scenarios
    }
    truths = {t: summary.GROUND_TRUTHS[t] for t in GROUND_TRUTHS}
    identity_rows = identities.identities(cases, truths)
    findings = summary.findings(cases, scenarios, identity_rows)
    thresholds = [summary.evaluate_threshold(t, cases) for t in config.thresholds]
    kernel_verdicts = judge_kernels(config, computed, diagnose, progress)
    errors = [
        {
            "scenario": c["scenario"],
            "recipe": c["recipe"],
            "implementation": c["implementation"],
            "error": c["error"],
        }
        for c in cases
        if c["status"] == "error"
    ]
    failed = (
        errors
        or any(not t["passed"] for t in thresholds)
        or any(not v["passed"] for v in kernel_verdicts)
    )
    report = {
        "schema_version": schema.SCHEMA_VERSION,
        "tool": "fp4sim report",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "exit_code": 1 if failed else 0,
        "versions": collect_versions(),
        "settings": {
            "seed": config.seed,
            "device": config.device,
            "preset": config.preset,
            "recipes": list(config.recipes),
            "scenarios": order,
            "implementations": [i.name for i in config.implementations],
            "kernels": [i.to_json() for i in config.implementations if i.kind == "external"],
            "variants": list(config.variants),
            "ground_truth": GROUND_TRUTHS[0],
            "ground_truths": list(GROUND_TRUTHS),
            "identity_tolerance": identities.IDENTITY_TOLERANCE,
            "fail_on": [t.text for t in config.thresholds],
            "element_guard_eps": metrics.ELEMENT_GUARD_EPS,
            "log10_edges": list(metrics.LOG10_EDGES),
            "quantiles": list(metrics.QUANTILES),
            "sm_scale": "1/sqrt(head_dim) unless the scenario sets one",
            "do_distribution": "N(0, 1), drawn after q, k, v from the scenario generator",
            "forward_mode": "tiled",
            "accum_dtype": "float32",
            "torch_threads": 1 if config.device == "cpu" else torch.get_num_threads(),
        },
        "scenarios": scenarios,
        "cases": cases,
        "summary": {
            "actions": summary.actions(cases, findings, thresholds, kernel_verdicts),
            "ranking": summary.ranking(cases, identity_rows),
            "findings": findings,
            "identities": identity_rows,
            "variant_errors": summary.variant_errors(cases, order),
            "forward": summary.forward_rows(cases, order),
        },
        "verdicts": kernel_verdicts,
        "statistics_assumptions": list(error_statistics.ASSUMPTIONS),
        "thresholds": thresholds,
        "errors": errors,
        "timing": {
            "compute_seconds": computed.compute_seconds,
            "scenario_seconds": computed.scenario_seconds,
            "ranks": computed.ranks,
            "rank_seconds": computed.rank_seconds,
            "gather_seconds": computed.gather_seconds,
        },
    }
    report["timing"]["analysis_seconds"] = round(time.perf_counter() - start, 3)
    return report
