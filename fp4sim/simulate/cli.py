"""``fp4sim simulate``: train one small LM per attention backward variant and compare.

Exit codes: 0 every variant trained (a diverging run is a result, not an error);
1 a variant failed with an exception or a kernel call ran past --timeout (its traceback is
in the report); 2 usage error (unknown variant, recipe, task, config or kernel, a negative
seed, a bad device or --block-n; no CUDA; output folder), in one line before any training.
The kernel is loaded with the loader of ``fp4sim check`` and ``report`` (fp4sim.harness).
"""

from __future__ import annotations

import argparse
import sys

import torch

from fp4sim.harness import add_kernel_options, one_line_errors
from fp4sim.publish.console import progress_line
from fp4sim.publish.folder import ReportFolderError, check_output_folder, write_report_folder
from fp4sim.simulate.config import PRESETS, get_preset, with_overrides
from fp4sim.simulate.runner import run_simulation
from fp4sim.simulate.tasks import TASKS
from fp4sim.simulate.variants import (
    VALID_VARIANTS,
    SimulationSetupError,
    load_kernel,
    resolve_recipe,
)

DEFAULT_OUT = "fp4sim-simulate"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="preset: 'gpu' (the paper-scale ablation), 'gpu-strong' (a recall "
                             "bf16 solves, issue 19) or 'cpu' (reduced); "
                             "default gpu when CUDA is available, else cpu")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help=f"variants to train, from {', '.join(VALID_VARIANTS)} and "
                             "'kernel' (with --kernel); default bf16 attn_qat p_only o_only "
                             "drop_in (with --kernel: bf16 attn_qat kernel)")
    parser.add_argument("--recipe", default=None,
                        help="reference FP4 recipe for the FP4 variants (default attn-qat)")
    parser.add_argument("--block-n", type=int, default=None,
                        help="P tile width replacing the recipe's (default 32; 0 keeps it)")

    one_line_errors(parser)
    # --kernel (trained as variant 'kernel'), --kernel-dtype (q, k, v are cast to it before
    # the call, the output cast back; one dtype here), --timeout (per kernel call)
    add_kernel_options(parser, what="attention", capabilities=False)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    parser.add_argument("--task", choices=sorted(TASKS), default=None,
                        help="synthetic task (default: the preset's, recall)")
    size = "(default: the config's)"
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per variant " + size)
    parser.add_argument("--batch-size", type=int, default=None, help=size)
    parser.add_argument("--seq-len", type=int, default=None, help=size)
    parser.add_argument("--width", type=int, default=None, help=size)
    parser.add_argument("--layers", type=int, default=None, dest="n_layers", help=size)
    parser.add_argument("--heads", type=int, default=None, dest="n_heads", help=size)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate " + size)
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="train this many variants at once, each in its own process; with "
                             "--device cuda variant i runs on GPU i mod the visible GPUs "
                             "(default 1)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="progress line every N steps (default: about 20 per variant)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing report folder")


def _is_cuda(device: str) -> bool:
    name, _, index = device.partition(":")
    return name == "cuda" and (not index or index.isdigit())


def _error(message: str) -> int:
    print(f"fp4sim simulate: error: {message}", file=sys.stderr)
    return 2


def _log(line: str) -> None:
    progress_line(line)


def run(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    preset_name = args.config or ("gpu" if cuda else "cpu")
    if args.seed is not None and args.seed < 0:
        return _error(f"--seed must be >= 0, got {args.seed}")
    if args.device is not None and args.device != "cpu" and not _is_cuda(args.device):
        return _error(f"--device must be cpu or cuda (or cuda:N), got {args.device!r}")
    kernel_dtype = None
    if args.kernel_dtype:
        if len(args.kernel_dtype) > 1:
            return _error("simulate trains with one --kernel-dtype, got "
                          f"{' '.join(args.kernel_dtype)}")
        kernel_dtype = args.kernel_dtype[0]
    try:
        config = get_preset(preset_name)
        variants = tuple(args.variants) if args.variants else (
            ("bf16", "attn_qat", "kernel") if args.kernel else None)
        config = with_overrides(
            config, variants=variants, recipe=args.recipe, block_n=args.block_n,
            kernel=args.kernel, kernel_dtype=kernel_dtype, device=args.device,
            task=args.task, steps=args.steps,
            batch_size=args.batch_size, seq_len=args.seq_len, width=args.width,
            n_layers=args.n_layers, n_heads=args.n_heads, lr=args.lr, seed=args.seed,
            log_every=args.log_every, jobs=args.jobs, kernel_timeout=args.timeout)
        resolve_recipe(config.recipe, config.block_n)  # --recipe, --block-n before any work
        if config.kernel:  # loaded even when no chosen variant uses it: a typo is an error
            load_kernel(config.kernel)
    except ValueError as error:  # SimulationSetupError is a ValueError
        return _error(str(error))
    if config.device.startswith("cuda") and not cuda:
        return _error(f"device {config.device!r} asked for (config '{config.name}') but CUDA is "
                      "not available; use --device cpu or --config cpu")
    try:
        check_output_folder(args.out, overwrite=args.overwrite)
    except ReportFolderError as error:
        return _error(str(error))

    if config.smoke:
        _log(f"config '{config.name}' is a SMOKE RUN: it checks that every variant trains; "
             "it is not expected to reproduce the paper's full split")
    try:
        result = run_simulation(config, log=_log)
    except SimulationSetupError as error:
        return _error(str(error))

    # lazy: matplotlib: heavy startup on the CLI path, needed only once a run ends
    from fp4sim.simulate.report import build_html, build_report_json, build_summary_md

    summary = build_summary_md(result)
    try:
        out = write_report_folder(args.out, index_html=build_html(result),
                                  report_json=build_report_json(result), summary_md=summary,
                                  overwrite=args.overwrite)
    except ReportFolderError as error:
        return _error(str(error))
    print(summary)
    print(f"report written to {out}/index.html", file=sys.stderr)
    return 1 if result.any_failed else 0
