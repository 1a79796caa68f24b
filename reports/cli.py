"""``fp4sim report``: the FP4 attention error and gradient-error report.

    fp4sim report [--out DIR] [--overwrite] [--device cpu|cuda] [--recipes R ...]
                  [--scenarios S ...] [--quick | --full] [--seed N] [--fail-on METRIC<=BOUND ...]
                  [--kernel MODULE:ATTR ...] [--kernel-dtype DTYPE ...] [--timeout SECONDS]
                  [--claims RECIPE] [--no-gqa ...] [--inputs FILE]

External kernels are loaded and run through ``fp4sim.harness`` (the loader and options of
``fp4sim check``), each in a worker process: a hang or a crash fails only its cases.

The pipeline is one straight line, each room visited once: validate every argument
(before any work), compute the cases (``runner``; sharded over ranks under torchrun,
``distributed``), analyse them (``analysis``: identities, ranking, findings, thresholds,
kernel verdicts, exit code, timings), validate the report (``schema``), render
``index.html`` (``document``) and ``summary.md`` (``markdown``), write the folder
(``output``: atomically; an existing folder only with ``--overwrite``). Progress goes to
stderr. Exit codes (the rule of every fp4sim command): 0 all cases ran, every threshold
holds and every kernel's verdict passes; 1 a case failed to run (exception, time-out,
crash), a threshold is broken, or a kernel disagrees with its recipe or returns NaN/Inf
where the reference is finite (the report is still written); 2 usage error, reported in
one line before any work.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from fp4sim import reference
from fp4sim.harness import (
    KernelWorker,
    UsageError,
    add_kernel_options,
    kernel_spec_from_args,
    load_inputs_file,
)
from fp4sim.publish.folder import ReportFolderError, check_output_folder, write_report_folder
from fp4sim.reports import analysis, distributed, document, markdown, runner, schema, summary
from fp4sim.reports.scenarios import (
    ALL_SCENARIOS,
    FULL_SCENARIOS,
    PRODUCTION_SCENARIOS,
    QUICK_SCENARIOS,
    get_scenario,
    inputs_scenario,
)

QUICK_RECIPES = ("attn-qat", "attn-qat-consistent")


def configure_parser(parser: argparse.ArgumentParser) -> None:
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
        help="where the reference and kernels run; cuda adds the project's Triton kernels "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        metavar="RECIPE",
        help=f"recipes to evaluate (default: {' '.join(QUICK_RECIPES)}; with --full: all; a "
        "recipe a kernel claims is added)",
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
        help="the embedded default set (about 40 s on an idle 2-core CPU, without --kernel)",
    )
    preset.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="more strengths, lengths and head dims, and every recipe",
    )
    preset.add_argument(
        "--production",
        dest="preset",
        action="store_const",
        const="production",
        help="production shapes (long-rows-L16384, video-dit-L32760, llm-L131072-decode), run "
        "by the streaming reference; hours of CPU time: use a GPU or torchrun",
    )
    parser.set_defaults(preset="quick")
    parser.add_argument(
        "--stream-above",
        type=int,
        default=runner.STREAM_ABOVE,
        metavar="N",
        help="scenarios with more than N score entries (B*H*Lq*Lk) run the streaming "
        "reference and metrics, memory linear in L (default: %(default)s; 0: every scenario)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="input seed, >= 0 (default: %(default)s)"
    )
    parser.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="METRIC<=BOUND",
        help="exit 1 if the worst case breaks the bound; METRIC[@RECIPE]<=X or >=X; "
        f"metrics: {', '.join(summary.THRESHOLD_METRICS)}",
    )
    add_kernel_options(parser, what="attention", repeatable=True)
    parser.epilog = (
        "External kernels (--kernel, repeatable) run in a worker process at each "
        "--kernel-dtype (default: bfloat16 if the kernel takes it, else its first declared "
        "dtype); each gets a verdict against the recipe it claims (--claims or its "
        "fp4sim_spec) or, unclaimed, the recipe it matches best. Exit 0 ok, 1 a case failed, "
        "a threshold broke or a kernel's verdict failed (report still written), 2 usage error."
    )


def _check_recipe(name: str, what: str) -> None:
    if "@" in name and name.partition("@")[0] in reference.RECIPE_NAMES:
        # the report's streaming reference walks the keys in one pass (no kv_splits)
        option = name.partition("@")[2]
        flag = ("--kv-split-keys L" if option.startswith("kv_split_keys") else "--kv-splits N")
        raise UsageError(f"{what}: {name!r}: the report takes preset names only; a split-KV "
                         f"recipe is checked with `fp4sim check attention {flag}`")
    if name not in reference.RECIPE_NAMES:
        raise UsageError(
            f"{what}: unknown recipe {name!r}; valid recipes: {', '.join(reference.RECIPE_NAMES)}"
        )


def _start_kernels(args: argparse.Namespace, workers: list[KernelWorker]) -> list[Any]:
    """Load every --kernel in its worker (appended to ``workers`` as they start)."""
    overrides = kernel_spec_from_args(args)
    implementations: list[Any] = []
    for target in dict.fromkeys(args.kernel or []):
        worker = KernelWorker(
            target, spec_overrides=overrides, timeout=args.timeout, device=args.device
        )
        workers.append(worker)
        assert worker.spec is not None
        runner.log(f"fp4sim report: loaded {target} in a worker process")
        if worker.spec.claims is not None:
            _check_recipe(worker.spec.claims, f"{target} claims")
        implementations += runner.external_implementations(worker, args.kernel_dtype)
    return implementations


def _resolve(args: argparse.Namespace, workers: list[KernelWorker]) -> runner.ReportConfig:
    """Validate every argument, in order, before any computation; UsageError otherwise.
    Kernel workers are started last (appended to ``workers``, for the caller to close)."""
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0 (a NumPy generator seed), got {args.seed}")
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
        scenarios = {
            "full": FULL_SCENARIOS, "production": PRODUCTION_SCENARIOS
        }.get(args.preset, QUICK_SCENARIOS)
    if args.stream_above < 0:
        raise UsageError(f"--stream-above must be >= 0, got {args.stream_above}")
    default_recipes = reference.RECIPE_NAMES if args.preset == "full" else QUICK_RECIPES
    recipes = tuple(dict.fromkeys(args.recipes or default_recipes))
    unknown = [r for r in recipes if r not in reference.RECIPE_NAMES]
    if unknown:
        raise UsageError(
            f"unknown recipe(s) {', '.join(map(repr, unknown))}; valid recipes: "
            f"{', '.join(reference.RECIPE_NAMES)}"
        )
    if args.claims is not None:
        _check_recipe(args.claims, "--claims")
        if not args.kernel:
            raise UsageError("--claims names the recipe of a --kernel; no --kernel was given")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    try:
        thresholds = tuple(summary.parse_threshold(t) for t in args.fail_on)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.inputs:
        scenarios = (*scenarios, inputs_scenario(args.inputs, load_inputs_file(args.inputs)))
    implementations = [runner.REFERENCE]
    if args.device == "cuda":
        implementations.append(runner.triton_implementation())
    implementations += _start_kernels(args, workers)
    claimed = [i.spec.claims for i in implementations if i.spec is not None and i.spec.claims]
    recipes = tuple(dict.fromkeys((*recipes, *claimed)))
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
        preset=args.preset if not (args.scenarios or args.inputs) else "custom",
        thresholds=thresholds,
        stream_above=args.stream_above,
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    world = distributed.world_from_env()
    workers: list[KernelWorker] = []
    try:
        try:
            config = _resolve(args, workers)
        except UsageError as exc:
            print(f"fp4sim report: error: {exc}", file=sys.stderr)
            return 2
        with distributed.process_group(world, config.device):
            code = _run(args, config, world, start)
            return distributed.share_exit_code(world, code)
    finally:
        for worker in workers:
            worker.close()


def _run(
    args: argparse.Namespace,
    config: runner.ReportConfig,
    world: distributed.World,
    start: float,
) -> int:
    total = len(config.scenarios) * len(config.recipes) * len(config.implementations)
    if world.leader:
        runner.log(
            f"fp4sim report: {len(config.scenarios)} scenarios x {len(config.recipes)} recipes x "
            f"{len(config.implementations)} implementations = {total} cases on {config.device}, "
            f"seed {config.seed}" + (f", {world.size} ranks" if world.size > 1 else "")
        )
    # 1. compute
    computed = (
        distributed.compute_sharded(config, world, runner.log)
        if world.size > 1
        else runner.compute(config)
    )
    report: dict[str, Any] | None = None
    if computed is not None:  # rank 0 (or the only process) from here
        # 2. analyse (timings included, so the page and report.json carry the same ones)
        report = analysis.analyse(
            config, computed, diagnose=runner.diagnoser(config), progress=runner.log
        )
        report["timing"]["total_seconds_before_render"] = round(
            time.perf_counter() - start, 3
        )
        # 3. validate, before anything is rendered
        schema.assert_valid_report(report)
    # 4. render (the case figures shared by every rank under torchrun)
    rendered = distributed.render_shared(world, report) if world.size > 1 else None
    if report is None:  # a non-zero rank: its results and figures went to rank 0
        return 0
    runner.log("fp4sim report: rendering the page")
    html_text = document.build_page(report, rendered)
    summary_md = markdown.summary_markdown(report)
    # print what to act on before writing anything, so a failed write loses no diagnosis
    for action in report["summary"]["actions"]:
        runner.log(f"  ! {action['text']}")
    for verdict in report["verdicts"]:
        runner.log(f"  {verdict['text']}")
    for finding in report["summary"]["findings"]:
        runner.log(f"  - {finding['text']}")
    for t in report["thresholds"]:
        runner.log(
            f"  threshold {t['threshold']}: worst {t['worst_value']} at {t['worst_case']}: "
            f"{'pass' if t['passed'] else 'FAIL'}"
        )
    # 5. write
    try:
        out = write_report_folder(
            args.out,
            index_html=html_text,
            report_json=report,
            summary_md=summary_md,
            overwrite=args.overwrite,
        )
    except (ReportFolderError, OSError) as exc:
        print(f"fp4sim report: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    runner.log(
        f"fp4sim report: wrote {out}/index.html, report.json, summary.md "
        f"in {time.perf_counter() - start:.1f} s (exit {report['exit_code']})"
    )
    return int(report["exit_code"])

