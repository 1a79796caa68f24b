"""The `fp4sim` command: dispatches to the subcommands of the top layer.

Each subcommand lives in its own module exposing ``configure_parser(parser)`` and
``run(args) -> int``; modules are imported lazily so `fp4sim --help` stays fast and a
missing optional dependency only breaks the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": ("fp4sim.testing.check_cli", "check an external quantizer or attention kernel"),
    "report": ("fp4sim.reports.cli", "write the FP4 attention error and gradient-error report"),
    "simulate": ("fp4sim.simulate.cli", "train tiny models per backward variant (stability)"),
    "demo": ("fp4sim.demo", "quantize a small tensor and print codes, scales and errors"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the module of ``command`` (if given) is imported."""
    parser = argparse.ArgumentParser(
        prog="fp4sim",
        description="Numerical verification and simulation for FP4 (E2M1) attention.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure_parser(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
