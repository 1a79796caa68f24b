"""The `fp4sim check` subcommand: `fp4sim check quantizer|attention --kernel MODULE:ATTR ...`.

Exit codes (the same for every fp4sim command): 0 every drawn example agreed; 1 a
disagreement was found, including a kernel that timed out or crashed on a case (diagnosis
printed, then the reproduction script written); 2 usage error (bad import path, not
callable, wrong signature, unknown recipe, bad option value, unwritable or existing
--repro-out, --device cuda without CUDA), reported in one line before any work.

The kernel runs in a worker process (fp4sim.harness.KernelWorker): a hang becomes
"timed out after N s" and a hard crash "crashed with signal 11 (SIGSEGV)".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path
from typing import Any

from fp4sim.formats import BLOCK_FORMATS
from fp4sim.harness import (
    UsageError,
    add_kernel_options,
    kernel_spec_from_args,
    load_inputs_file,
    one_line_errors,
    positive_int,
)
from fp4sim.harness.ranks import (
    World,
    own_gpu_only,
    process_group,
    share_exit_code,
    world_from_env,
)
from fp4sim.judge.inputs import DISTRIBUTIONS, TENSOR_DISTRIBUTIONS
from fp4sim.settings import DEFAULTS, RULES

__all__ = ["configure_parser", "run"]

_QUANTIZER_DISTRIBUTIONS = ",".join(TENSOR_DISTRIBUTIONS)
_REPRO_MARK = "Reproduces a failure found by `fp4sim check"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _tensor_scale(text: str) -> str | float | None:
    if text == "none":
        return None
    if text == "amax":
        return "amax"
    try:
        value = float(text)
    except ValueError as err:
        message = f"none, amax or a positive number expected, got {text!r}"
        raise argparse.ArgumentTypeError(message) from err
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"a tensor scale must be positive and finite: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a number of seconds expected, got {text!r}") from err
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser, what: str) -> None:
    one_line_errors(parser)
    add_kernel_options(parser, what=what, required=True)
    examples = 100 if what == "quantizer" else 50  # QuantizerCheckConfig, AttentionCheckConfig
    parser.add_argument("--examples", type=positive_int, default=None,
                        help=f"examples to draw (default {examples})")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device the kernel's inputs live on (default cpu; cuda needs CUDA)")
    parser.add_argument(
        "--repro-out", default=None, metavar="FILE",
        help=f"reproduction script written on failure (default fp4sim-check-repro-{what}.py"
             " in the current folder, never overwriting one: a free name is chosen)",
    )
    parser.add_argument("--overwrite-repro", action="store_true",
                        help="allow --repro-out to replace an existing file (default: refuse)")
    parser.add_argument("--shrink-seconds", type=_seconds, default=60.0,
                        help="time budget for shrinking a failing case (default 60)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the verdict: no diagnosis, no progress lines"
                             " (default: both printed, progress on stderr)")
    parser.add_argument("--no-system", action="store_true",
                        help="skip the system properties (independence, repeatability, stale"
                             " state, layouts, ...) run after the recipe check (default: run"
                             " them)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="check_target", metavar="TARGET")
    quant = sub.add_parser(
        "quantizer",
        help="x -> (packed uint8, scale bytes, tensor scale or None), bit-exact vs the emulator",
        description="Check a quantizer bit for bit against fp4sim.quantize.",
    )
    _common(quant, "quantizer")
    formats = " or ".join(f"{name} ({f.block_size}, {f.scale.name.upper()} scales)"
                          for name, f in BLOCK_FORMATS.items())
    quant.add_argument("--format", dest="fmt", choices=tuple(BLOCK_FORMATS), required=True,
                       help=f"block format: {formats} (required)")
    quant.add_argument("--tensor-scale", type=_tensor_scale, default=None,
                       help="nvfp4 per-tensor scale: none, amax or a positive number"
                            " (default none)")
    # choices and defaults from the one home of the settings (fp4sim.settings)
    quant.add_argument("--scale-rule", choices=RULES["scale_rule"].allowed, default=None,
                       help=f"mxfp4 E8M0 scale rule (default {DEFAULTS['scale_rule']})")
    quant.add_argument("--scale-op", choices=RULES["scale_op"].allowed, default=None,
                       help="nvfp4: x times 1/scale or x / scale"
                            f" (default {DEFAULTS['scale_op']})")
    quant.add_argument("--scale-amax-op", choices=RULES["scale_amax_op"].allowed, default=None,
                       help="nvfp4: amax/6 or amax*(1/6) for the block scale"
                            f" (default {DEFAULTS['scale_amax_op']})")
    quant.add_argument("--scale-lower-clamp", action="store_true", default=None,
                       help="nvfp4: clamp block scales to the smallest normal E4M3"
                            f" (default {'on' if DEFAULTS['scale_lower_clamp'] else 'off'})")
    quant.add_argument("--zero-scale-codes", choices=RULES["zero_scale_codes"].allowed,
                       default=None,
                       help="nvfp4: codes in blocks whose scale is 0: zeros, or x*(1/0)"
                            f" (default {DEFAULTS['zero_scale_codes']})")
    quant.add_argument("--nan", choices=RULES["nan"].allowed, default=None,
                       help="E2M1 code of NaN inputs: ptx (+6) or ml_dtypes (signed zero)"
                            f" (default {DEFAULTS['nan']})")
    quant.add_argument(
        "--input", dest="input_type", choices=("auto", "torch", "numpy"), default="auto",
        help="what the kernel takes: auto (torch, else numpy; torch only on cuda),"
             " torch or numpy (default auto)",
    )
    quant.add_argument(
        "--distributions", type=_csv, default=None,
        help=f"comma-separated subset of {_QUANTIZER_DISTRIBUTIONS} (default all)",
    )
    quant.add_argument("--max-rows", type=positive_int, default=4,
                       help="largest number of rows drawn (default 4)")
    quant.add_argument("--max-blocks", type=positive_int, default=4,
                       help="largest number of blocks per row drawn (default 4)")

    attn = sub.add_parser(
        "attention", help="(q, k, v, causal, sm_scale) -> o with autograd, vs the reference",
        description="Check an attention kernel (O, and dQ, dK, dV) against a reference recipe"
                    " under the FP4 tolerance rule, on inputs the kernel declares it supports.",
    )
    _common(attn, "attention")
    attn.add_argument("--recipe", default=None,
                      help="reference recipe preset (default: --claims, else the claims of "
                           "the kernel's fp4sim_spec, else attn-qat)")
    attn.add_argument("--kv-splits", type=positive_int, default=None, metavar="N",
                      help="the kernel is split-KV (flash-decoding): its key tiles cut into N "
                           "splits of ceil(tiles / N), each with its own running max; checks "
                           "against RECIPE@kv_splits=N (default: one pass)")
    attn.add_argument("--kv-split-keys", type=positive_int, default=None, metavar="L",
                      help="the same with splits of L keys each (a multiple of the recipe's "
                           "key tile), RECIPE@kv_split_keys=L (default: one pass)")
    attn.add_argument("--causal", action="store_true", help="draw causal cases (default off)")
    attn.add_argument("--max-len", type=positive_int, default=80,
                      help="longest Lq, Lk drawn (default 80)")
    attn.add_argument("--distributions", type=_csv, default=None,
                      help="comma-separated input distributions (default all)")


def _settings(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    out: list[tuple[str, Any]] = []
    nvfp4_only = (
        "tensor_scale",
        "scale_op",
        "scale_amax_op",
        "scale_lower_clamp",
        "zero_scale_codes",
    )
    for name in (
        "tensor_scale",
        "scale_rule",
        "scale_op",
        "scale_amax_op",
        "scale_lower_clamp",
        "zero_scale_codes",
        "nan",
    ):
        value = getattr(args, name)
        if value is None:
            continue
        if args.fmt == "mxfp4" and name in nvfp4_only:
            raise _Usage(f"--{name.replace('_', '-')} applies to nvfp4 only")
        if args.fmt == "nvfp4" and name == "scale_rule":
            raise _Usage("--scale-rule applies to mxfp4 only")
        out.append((name, value))
    return tuple(out)


class _Usage(Exception):
    pass


def _build_config(args: argparse.Namespace) -> Any:
    # lazy: torch and Hypothesis extras: `fp4sim check --help` works with NumPy alone
    from fp4sim.testing import check_attention, check_quantizer

    common: dict[str, Any] = {
        "kernel": args.kernel,
        "seed": args.seed,
        "device": args.device,
        "shrink_seconds": args.shrink_seconds,
        "timeout": args.timeout,
    }
    if args.examples is not None:
        common["examples"] = args.examples
    if args.check_target == "quantizer":
        if args.kernel_dtype:
            common["dtypes"] = tuple(args.kernel_dtype)
        if args.distributions is not None:
            common["distributions"] = args.distributions
        return check_quantizer.QuantizerCheckConfig(
            fmt=args.fmt,
            settings=_settings(args),
            input_type=args.input_type,
            max_rows=args.max_rows,
            max_blocks=args.max_blocks,
            **common,
        )
    if args.distributions is not None:
        bad = [d for d in args.distributions if d not in DISTRIBUTIONS]
        if bad:
            raise _Usage(f"--distributions: unknown {bad}; known: {sorted(DISTRIBUTIONS)}")
        common["distributions"] = args.distributions
    if args.inputs is not None:
        load_inputs_file(args.inputs)  # fail fast on a missing or malformed file
    overrides = kernel_spec_from_args(args)
    return check_attention.AttentionCheckConfig(
        # None: the kernel's claims (--claims or its fp4sim_spec), else attn-qat
        recipe=args.recipe or args.claims,
        kv_splits=args.kv_splits or 1,
        kv_split_keys=args.kv_split_keys or 0,
        causal=args.causal,
        backward=not args.forward_only,
        max_len=args.max_len,
        kernel_overrides=overrides,
        inputs=args.inputs,
        **common,
    )


def _is_repro_script(path: Path, target: str, kernel: str) -> bool:
    """A reproduction script written by `fp4sim check TARGET` for this kernel."""
    try:
        head = path.read_text(errors="replace")[:20000]
    except OSError:
        return False
    return f"{_REPRO_MARK} {target}`" in head and repr(kernel) in head


def _repro_path(args: argparse.Namespace, target: str) -> tuple[Path, bool]:
    """(where the script would go, whether it is the default path); usage error for an
    --repro-out that cannot be written or exists (without --overwrite-repro)."""
    if args.repro_out is None:
        return Path(f"fp4sim-check-repro-{target}.py"), True
    path = Path(args.repro_out)
    if path.is_dir():
        raise _Usage(f"--repro-out {path} is a folder; give a file name")
    if path.exists() and not args.overwrite_repro:
        raise _Usage(f"--repro-out {path} exists; pass --overwrite-repro to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise _Usage(f"--repro-out {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _Usage(f"--repro-out {path}: not writable")
    return path, False


def _free_default(path: Path) -> Path:
    """The default path, or the first free numbered variant (never overwrite a file)."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def run(args: argparse.Namespace) -> int:
    """The recipe check, then the kernel's system properties (issue 20; ``--no-system``
    skips them), each with its own verdict line. Under torchrun the recipe check's examples
    are judged over the ranks (``fp4sim.testing.check_shards``) and rank 0 alone prints,
    writes the reproduction script and runs the system properties; every rank exits with
    rank 0's code."""
    world = world_from_env()
    if world.size > 1:
        return _run_sharded(args, world)
    return _then_system_properties(args, *_run_recipe_check(args))


def _then_system_properties(args: argparse.Namespace, code: int,
                            recipe: str | None = None) -> int:
    """The system properties after the recipe check's ``code`` (not after a usage error),
    against the ``recipe`` the recipe check used."""
    if code == 2 or getattr(args, "no_system", False):
        return code
    # under torchrun this import must also follow the drawing: Hypothesis draws constants
    # from the loaded modules (check_shards' docstring)
    # lazy: torch and Hypothesis extras: `fp4sim check --help` works with NumPy alone
    from fp4sim.testing.system.isolated import check_after_recipe

    config = _build_config(args)
    if recipe is not None:
        config = dataclasses.replace(config, recipe=recipe, kv_splits=1, kv_split_keys=0)
    return check_after_recipe(config, args.check_target, code)


# how long the other ranks wait for rank 0's shrinking, diagnosis and system properties
# (each bounded by --shrink-seconds and the per-call --timeout)
_RANK_WAIT = datetime.timedelta(hours=6)


def _run_sharded(args: argparse.Namespace, world: World) -> int:
    # lazy: torch and Hypothesis extras: `fp4sim check --help` works with NumPy alone
    from fp4sim.testing.check_shards import Shards

    if getattr(args, "device", "cpu") == "cuda":
        own_gpu_only(world)  # this rank's kernel workers on GPU LOCAL_RANK, seen as cuda
    # gloo even with --device cuda: the ranks exchange small Python objects, the reference
    # runs on the CPU and only the kernel worker (a child process) uses the GPU
    with process_group(world, "cpu", backend="gloo", timeout=_RANK_WAIT):
        code, recipe = _run_recipe_check(args, Shards(world))
        if world.leader:  # rank 0 alone, after the drawing (check_shards' docstring)
            code = _then_system_properties(args, code, recipe)
        return share_exit_code(world, code)


def _run_recipe_check(args: argparse.Namespace, shards: Any = None) -> tuple[int, str | None]:
    """(exit code, the recipe the attention check used: named or the kernel's claims)."""
    used: dict[str, str] = {}
    code = _recipe_check(args, shards, used)
    return code, used.get("recipe")


def _recipe_check(args: argparse.Namespace, shards: Any, used: dict[str, str]) -> int:
    """The recipe check in one process, or this rank's part of it (``shards``: a
    ``check_shards.Shards``); only rank 0 prints (the other ranks return 0, and the caller
    gives every rank rank 0's code). ``used["recipe"]``: the attention check's recipe."""
    # lazy: torch and Hypothesis extras: `fp4sim check --help` works with NumPy alone
    from fp4sim.testing import check_attention, check_quantizer
    from fp4sim.testing.repro import write_repro_script

    leader = shards is None or shards.leader
    target = getattr(args, "check_target", None)
    if target not in ("quantizer", "attention"):
        if leader:
            print("fp4sim check: choose a target: quantizer or attention (see --help)",
                  file=sys.stderr)
        return 2
    prefix = f"fp4sim check {target}"

    def log(line: str) -> None:
        print(f"{prefix}: {line}", file=sys.stderr, flush=True)

    try:
        repro_path, is_default = _repro_path(args, target)
        config = _build_config(args)
        check_attention.check_device(args.device)
        progress = None if args.quiet or not leader else log
        if target == "quantizer":
            result = check_quantizer.run_quantizer_check(config, log=progress, shards=shards)
        else:
            result = check_attention.run_attention_check(config, log=progress, shards=shards)
    except (UsageError, _Usage) as err:
        message = str(err)
        if shards is not None and not shards.met:
            try:  # the other ranks learn of it at their meeting (and this rank of theirs)
                shards.meet(message)
            except UsageError as first:
                message = str(first)
        if leader:
            print(f"{prefix}: usage error: {message}", file=sys.stderr)
        return 2
    if result is None:  # a rank other than 0: rank 0 reports
        return 0
    if target == "attention" and result.recipe is not None:
        # the recipe as checked (the kernel's claims when none was named), for the verdict
        # line, the reproduction script and the system properties
        config = dataclasses.replace(config, recipe=result.recipe, kv_splits=1,
                                     kv_split_keys=0)
        used["recipe"] = result.recipe
    untested, conventions, restarts = result.untested, result.conventions, result.restarts
    if result.ok:
        print(f"{prefix}: OK: {result.examples_run} examples agree ({config.kernel}, seed"
              f" {config.seed}{', recipe ' + config.recipe if target == 'attention' else ''})")
        for line in conventions:
            print(f"  convention: {line}")
        for line in untested:
            print(f"  untested: {line}")
        if is_default and repro_path.exists() and _is_repro_script(repro_path, target,
                                                                   config.kernel):
            repro_path.unlink()  # the failure it reproduced is gone: do not leave it behind
            print(f"  removed the stale {repro_path} (it now passes)", file=sys.stderr)
        return 0
    # the diagnosis first: nothing that follows may lose it
    print(f"{prefix}: FAIL after {result.first_failure_at} example(s)"
          f" ({config.kernel}, seed {config.seed}"
          f"{', recipe ' + config.recipe if target == 'attention' else ''}); "
          + ("shrunk case:" if result.case is not None else "no case:"))
    if not args.quiet:
        print(result.diagnosis)
        if result.blob:
            print(f"Hypothesis blob: {result.blob}")
        for line in conventions:
            print(f"  convention: {line}")
        for line in untested:
            print(f"  untested: {line}")
        if restarts:
            print(f"  the kernel's worker was restarted {restarts} time(s)")
    sys.stdout.flush()
    if result.case is None:
        return 1
    if is_default:
        if repro_path.exists() and _is_repro_script(repro_path, target, config.kernel):
            pass  # our own stale script for this kernel: replaced by the newer failure
        else:
            repro_path = _free_default(repro_path)
    try:
        write_repro_script(repro_path, target, config, result.case, result.blob)
    except OSError as err:
        print(f"{prefix}: could not write the reproduction script {repro_path}: {err}",
              file=sys.stderr)
        return 1
    print(f"reproduce: python {repro_path}")
    return 1
