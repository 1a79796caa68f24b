"""The kernel options shared by ``fp4sim check``, ``report`` and ``simulate``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from fp4sim.harness.spec import DTYPES, LAYOUTS

__all__ = [
    "DEFAULT_TIMEOUT",
    "add_kernel_options",
    "kernel_spec_from_args",
    "one_line_errors",
    "positive_int",
]

# Generous enough for a first call that JIT-compiles a Triton kernel (tens of seconds on a
# GPU, minutes under TRITON_INTERPRET), short enough that a hang is reported the same hour.
DEFAULT_TIMEOUT = 300.0

# what a capability flag defaults to: the kernel's own declaration (KernelSpec)
_SPEC_DEFAULT = "as the kernel's fp4sim_spec declares, else off"


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a number of seconds expected, got {text!r}") from err
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"an integer expected, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _head_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace(" ", ",").split(",") if part)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") \
            from err
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"head dims must be positive integers, got {text!r}")
    return dims


class _DtypeList(argparse.Action):
    """One or more dtypes, space- or comma-separated, validated against DTYPES."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: str | Sequence[Any] | None, option_string: str | None = None,
    ) -> None:
        items = [values] if isinstance(values, str) else list(values or [])
        names = tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())
        bad = [n for n in names if n not in DTYPES]
        if bad or not names:
            parser.error(f"argument {option_string}: unknown dtype(s) {bad or '[]'};"
                         f" choose from {', '.join(DTYPES)}")
        setattr(namespace, self.dest, tuple(dict.fromkeys(names)))


def add_kernel_options(
    parser: argparse.ArgumentParser, *, what: str = "attention", repeatable: bool = False,
    required: bool = False, capabilities: bool = True,
) -> None:
    """Add --kernel, --kernel-dtype, --timeout and (for attention, unless ``capabilities`` is
    False) --claims, the capability flags and --inputs to ``parser``."""
    signature = ("fn(x) -> (packed uint8, scale bytes, tensor scale or None)"
                 if what == "quantizer" else "fn(q, k, v, causal, sm_scale) -> o")
    parser.add_argument(
        "--kernel", metavar="MODULE:ATTR", required=required,
        action="append" if repeatable else "store", default=None,
        help=f"the kernel {signature}, imported with the current folder first on sys.path"
             + (" (repeat for several kernels)" if repeatable else "")
             + (" (required)" if required else ""),
    )
    parser.add_argument(
        "--kernel-dtype", "--dtypes", dest="kernel_dtype", nargs="+", action=_DtypeList,
        metavar="DTYPE", default=None,
        help=f"input dtype(s) the kernel takes, one or more of {', '.join(DTYPES)}"
             " (space- or comma-separated; default: the kernel's fp4sim_spec, else "
             + ("float32)" if what == "quantizer" else "all three)"),
    )
    parser.add_argument(
        "--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="limit on each call of the kernel; a call that runs longer is reported as"
             f" 'timed out' and the kernel's worker restarted (default {DEFAULT_TIMEOUT:g})",
    )
    if what == "quantizer" or not capabilities:
        return
    parser.add_argument(
        "--claims", default=None, metavar="RECIPE",
        help="the recipe the kernel claims to implement (default: its fp4sim_spec's claims)",
    )
    parser.add_argument("--no-gqa", action="store_true",
                        help="the kernel needs as many k/v heads as q heads (no GQA inputs;"
                             f" default: {_SPEC_DEFAULT})")
    parser.add_argument("--no-causal", action="store_true",
                        help=f"the kernel has no causal mask (default: {_SPEC_DEFAULT})")
    parser.add_argument("--no-causal-unequal", action="store_true",
                        help="causal only with Lq == Lk, bottom-right alignment untested"
                             f" (default: {_SPEC_DEFAULT})")
    parser.add_argument("--head-dims", type=_head_dims, default=None, metavar="D[,D...]",
                        help="head dims the kernel supports (default: its fp4sim_spec's, "
                             "else any; check draws 64,128)")
    parser.add_argument("--length-multiple", type=positive_int, default=None, metavar="N",
                        help="Lq and Lk must be multiples of N (default 1)")
    parser.add_argument("--min-length", type=positive_int, default=None, metavar="N",
                        help="shortest Lq, Lk the kernel takes (default 1)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="tensor layout the kernel takes and returns: bhld (batch, heads, "
                             "length, dim) or blhd (default bhld)")
    parser.add_argument("--forward-only", action="store_true",
                        help="the kernel has no backward: check O only, not dQ, dK, dV"
                             f" (default: {_SPEC_DEFAULT})")
    parser.add_argument("--modifies-inputs", action="store_true",
                        help="the kernel writes into q, k, v, so each call gets fresh copies"
                             f" (default: {_SPEC_DEFAULT})")
    parser.add_argument("--inputs", default=None, metavar="FILE",
                        help="captured activations (.npz, .pt or .safetensors holding q, k, v "
                             "and optionally do) checked as one more case (default: none)")


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` report a bad option in one line (exit 2), without the usage block."""

    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: usage error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def kernel_spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides for ``load_attention_kernel`` from the flags that were given."""
    out: dict[str, Any] = {}
    if getattr(args, "kernel_dtype", None):
        out["dtypes"] = tuple(args.kernel_dtype)
    if getattr(args, "no_gqa", False):
        out["gqa"] = False
    if getattr(args, "no_causal", False):
        out["causal"] = False
    if getattr(args, "no_causal_unequal", False):
        out["causal_unequal"] = False
    for name in ("head_dims", "length_multiple", "min_length", "layout", "claims"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if getattr(args, "forward_only", False):
        out["backward"] = False
    if getattr(args, "modifies_inputs", False):
        out["modifies_inputs"] = True
    return out
