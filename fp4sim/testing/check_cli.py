"""The `fp4sim check` subcommand: `fp4sim check quantizer|attention --kernel MODULE:ATTR ...`.

Exit codes: 0 every drawn example agreed, 1 a disagreement was found (diagnosis printed,
reproduction script written), 2 usage error (bad import path, not callable, wrong
signature, unknown recipe).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["configure_parser", "run"]

_QUANTIZER_DISTRIBUTIONS = (
    "gaussian,ties,near_ties,scale_ties,student_t,lognormal,sparse_outliers,"
    "zero_blocks,below_flush,specials"
)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _tensor_scale(text: str) -> str | float | None:
    if text == "none":
        return None
    if text == "amax":
        return "amax"
    try:
        return float(text)
    except ValueError as err:
        message = f"--tensor-scale: none, amax or a number, got {text!r}"
        raise argparse.ArgumentTypeError(message) from err


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", required=True, metavar="MODULE:ATTR", help="the callable")
    parser.add_argument("--examples", type=int, default=None, help="examples to draw")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--repro-out",
        default=None,
        metavar="FILE",
        help="reproduction script path (default fp4sim-check-repro-<what>.py)",
    )
    parser.add_argument(
        "--shrink-seconds", type=float, default=60.0, help="time budget for shrinking"
    )
    parser.add_argument(
        "--dtypes", type=_csv, default=None, help="input dtypes (float32,bfloat16,float16)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the verdict")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="check_target", metavar="TARGET")
    quant = sub.add_parser(
        "quantizer",
        help="x -> (packed uint8, scale bytes, tensor scale or None), bit-exact vs the emulator",
    )
    _common(quant)
    quant.add_argument("--format", dest="fmt", choices=("nvfp4", "mxfp4"), required=True)
    quant.add_argument("--tensor-scale", type=_tensor_scale, default=None, help="none|amax|FLOAT")
    quant.add_argument("--scale-rule", choices=("rceil", "floor", "even", "ceil"), default=None)
    quant.add_argument("--scale-op", choices=("reciprocal", "divide"), default=None)
    quant.add_argument("--scale-amax-op", choices=("divide", "reciprocal"), default=None)
    quant.add_argument("--scale-lower-clamp", action="store_true", default=None)
    quant.add_argument("--zero-scale-codes", choices=("zeros", "reciprocal"), default=None)
    quant.add_argument("--nan", choices=("ptx", "ml_dtypes"), default=None)
    quant.add_argument(
        "--input", dest="input_type", choices=("auto", "torch", "numpy"), default="auto"
    )
    quant.add_argument(
        "--distributions", type=_csv, default=None, help=f"subset of {_QUANTIZER_DISTRIBUTIONS}"
    )
    quant.add_argument("--max-rows", type=int, default=4)
    quant.add_argument("--max-blocks", type=int, default=4)

    attn = sub.add_parser(
        "attention", help="(q, k, v, causal, sm_scale) -> o with autograd, vs the reference"
    )
    _common(attn)
    attn.add_argument("--recipe", default="attn-qat", help="reference recipe preset name")
    attn.add_argument("--causal", action="store_true")
    attn.add_argument("--forward-only", action="store_true", help="skip dQ, dK, dV")
    attn.add_argument("--head-dims", type=_csv, default=None, help="e.g. 64,128")
    attn.add_argument("--max-len", type=int, default=80)
    attn.add_argument("--distributions", type=_csv, default=None)


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
    from fp4sim.testing import check_attention, check_quantizer

    common: dict[str, Any] = {
        "kernel": args.kernel,
        "seed": args.seed,
        "device": args.device,
        "shrink_seconds": args.shrink_seconds,
    }
    if args.examples is not None:
        if args.examples < 1:
            raise _Usage("--examples must be >= 1")
        common["examples"] = args.examples
    if args.dtypes is not None:
        bad = [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]
        if bad or not args.dtypes:
            raise _Usage(f"--dtypes: unknown {bad}")
        common["dtypes"] = args.dtypes
    if args.check_target == "quantizer":
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
    if args.head_dims is not None:
        try:
            common["head_dims"] = tuple(int(h) for h in args.head_dims)
        except ValueError as err:
            raise _Usage(f"--head-dims: integers expected: {err}") from err
    if args.distributions is not None:
        from fp4sim.testing.generators import DISTRIBUTIONS

        bad = [d for d in args.distributions if d not in DISTRIBUTIONS]
        if bad:
            raise _Usage(f"--distributions: unknown {bad}; known: {sorted(DISTRIBUTIONS)}")
        common["distributions"] = args.distributions
    return check_attention.AttentionCheckConfig(
        recipe=args.recipe,
        causal=args.causal,
        backward=not args.forward_only,
        max_len=args.max_len,
        **common,
    )


def run(args: argparse.Namespace) -> int:
    from fp4sim.testing import check_attention, check_quantizer, kernel_loading
    from fp4sim.testing.repro import write_repro_script

    target = getattr(args, "check_target", None)
    if target not in ("quantizer", "attention"):
        print("fp4sim check: choose a target: quantizer or attention (see --help)", file=sys.stderr)
        return 2
    try:
        config = _build_config(args)
        if target == "quantizer":
            result = check_quantizer.run_quantizer_check(config)
        else:
            result = check_attention.run_attention_check(config)
    except (kernel_loading.UsageError, _Usage) as err:
        print(f"fp4sim check {target}: usage error: {err}", file=sys.stderr)
        return 2
    if result.ok:
        print(
            f"fp4sim check {target}: OK: {result.examples_run} examples agree"
            f" ({config.kernel}, seed {config.seed})"
        )
        return 0
    repro_path = args.repro_out or f"fp4sim-check-repro-{target}.py"
    write_repro_script(repro_path, target, config, result.case, result.blob)
    print(
        f"fp4sim check {target}: FAIL after {result.first_failure_at} example(s)"
        f" ({config.kernel}, seed {config.seed}); shrunk case:"
    )
    if not args.quiet:
        print(result.diagnosis)
        if result.blob:
            print(f"Hypothesis blob: {result.blob}")
    print(f"reproduce: python {repro_path}")
    return 1
