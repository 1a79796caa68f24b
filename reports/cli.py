"""``fp4sim report``: the FP4 attention error and gradient-error report.

    fp4sim report [--out DIR] [--overwrite] [--device cpu|cuda] [--recipes R ...]
                  [--kernel MODULE:ATTR ...] [--scenarios S ...] [--quick | --full]
                  [--seed N] [--fail-on METRIC<=BOUND ...]

Writes ``index.html``, ``report.json`` and ``summary.md`` into ``--out`` (atomically;
an existing folder only with ``--overwrite``). Progress goes to stderr. Exit codes:
0 all cases ran and every threshold holds, 1 a case crashed or a threshold is broken
(the report is still written), 2 usage error (unknown names, existing folder, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from fp4sim.reports.scenarios import ALL_SCENARIOS, FULL_SCENARIOS, QUICK_SCENARIOS

QUICK_RECIPES = ("attn-qat", "attn-qat-consistent")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from fp4sim.reports.summary import THRESHOLD_METRICS

    parser.add_argument(
        "--out", default="fp4sim-report", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing report folder (never done otherwise)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the reference (and kernels) run; cuda adds the Triton kernels",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        metavar="RECIPE",
        help=f"recipes to evaluate (default: {' '.join(QUICK_RECIPES)}; with --full: all)",
    )
    parser.add_argument(
        "--kernel",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="an external kernel fn(q, k, v, causal, sm_scale) -> o with autograd (repeatable)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        metavar="SCENARIO",
        help=f"scenarios to run (default: the --quick set); all: {', '.join(ALL_SCENARIOS)}",
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="the embedded default set (a few minutes on a 2-core CPU)",
    )
    preset.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="more strengths, lengths and head dims, and every recipe",
    )
    parser.set_defaults(preset="quick")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default: %(default)s)")
    parser.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="METRIC<=BOUND",
        help="exit 1 if the worst case breaks the bound; METRIC[@RECIPE]<=X or >=X; "
        f"metrics: {', '.join(THRESHOLD_METRICS)}",
    )


class UsageError(Exception):
    pass


def _resolve(args: argparse.Namespace) -> Any:
    """Validate every name before any computation; a ReportConfig or UsageError."""
    import torch

    from fp4sim import reference
    from fp4sim.reports import runner, summary
    from fp4sim.reports.output import ReportFolderError, check_output_folder
    from fp4sim.reports.scenarios import get_scenario

    try:
        check_output_folder(args.out, overwrite=args.overwrite)
    except ReportFolderError as exc:
        raise UsageError(str(exc)) from None
    if args.scenarios:
        try:
            scenarios = tuple(get_scenario(name) for name in dict.fromkeys(args.scenarios))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        scenarios = FULL_SCENARIOS if args.preset == "full" else QUICK_SCENARIOS
    default_recipes = reference.RECIPE_NAMES if args.preset == "full" else QUICK_RECIPES
    recipes = tuple(dict.fromkeys(args.recipes or default_recipes))
    unknown = [r for r in recipes if r not in reference.RECIPE_NAMES]
    if unknown:
        raise UsageError(
            f"unknown recipe(s) {', '.join(map(repr, unknown))}; valid recipes: "
            f"{', '.join(reference.RECIPE_NAMES)}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    implementations = [runner.REFERENCE]
    if args.device == "cuda":
        implementations.append(runner.triton_implementation())
    for target in dict.fromkeys(args.kernel):
        try:
            implementations.append(runner.load_external_kernel(target))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        thresholds = tuple(summary.parse_threshold(t) for t in args.fail_on)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    names = set(recipes) | {i.name for i in implementations}
    for t in thresholds:
        if t.recipe and t.recipe not in names:
            raise UsageError(
                f"--fail-on {t.text}: {t.recipe!r} is not a selected recipe or "
                f"implementation; selected: {', '.join(sorted(names))}"
            )
    return runner.ReportConfig(
        scenarios=scenarios,
        recipes=recipes,
        implementations=tuple(implementations),
        seed=args.seed,
        device=args.device,
        preset=args.preset if not args.scenarios else "custom",
        thresholds=thresholds,
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        config = _resolve(args)
    except UsageError as exc:
        print(f"fp4sim report: error: {exc}", file=sys.stderr)
        return 2
    from fp4sim.reports import document, runner, schema, summary
    from fp4sim.reports.output import ReportFolderError, write_report_folder

    total = len(config.scenarios) * len(config.recipes) * len(config.implementations)
    runner.log(
        f"fp4sim report: {len(config.scenarios)} scenarios x {len(config.recipes)} recipes x "
        f"{len(config.implementations)} implementations = {total} cases on {config.device}, "
        f"seed {config.seed}"
    )
    report = runner.run_report(config)
    runner.log("fp4sim report: rendering the page")
    html_text = document.build_page(report)
    report["timing"]["total_seconds_before_write"] = round(time.perf_counter() - start, 3)
    schema.assert_valid_report(report)
    try:
        out = write_report_folder(
            args.out,
            index_html=html_text,
            report_json=report,
            summary_md=summary.summary_markdown(report),
            overwrite=args.overwrite,
        )
    except ReportFolderError as exc:
        print(f"fp4sim report: error: {exc}", file=sys.stderr)
        return 2
    for finding in report["summary"]["findings"]:
        runner.log(f"  - {finding['text']}")
    for t in report["thresholds"]:
        runner.log(
            f"  threshold {t['threshold']}: worst {t['worst_value']} at {t['worst_case']}: "
            f"{'pass' if t['passed'] else 'FAIL'}"
        )
    if report["errors"]:
        runner.log(f"  {len(report['errors'])} case(s) crashed; tracebacks in the report")
    runner.log(
        f"fp4sim report: wrote {out}/index.html, report.json, summary.md "
        f"in {time.perf_counter() - start:.1f} s (exit {report['exit_code']})"
    )
    return int(report["exit_code"])
