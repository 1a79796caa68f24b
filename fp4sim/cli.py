"""The `fp4sim` command: dispatches to the subcommands of the top layer.

Each subcommand lives in its own module exposing ``configure_parser(parser)`` and
``run(args) -> int``; modules are imported lazily so `fp4sim --help` stays fast and a
missing optional dependency only breaks the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fp4sim import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": ("fp4sim.testing.check_cli", "check an external quantizer or attention kernel"),
    "report": ("fp4sim.reports.cli", "write the FP4 attention error and gradient-error report"),
    "simulate": ("fp4sim.simulate.cli", "train tiny models per backward variant (stability)"),
    "demo": ("fp4sim.demo", "quantize a small tensor and print codes, scales and errors"),
}

# optional dependencies (top-level import names) a subcommand may miss
OPTIONAL_DEPENDENCIES = frozenset(
    {"torch", "triton", "matplotlib", "hypothesis", "safetensors", "scipy"}
)
# what to install for each subcommand, so one `pip install` brings all it needs
SUBCOMMAND_EXTRAS: dict[str, str] = {
    "check": "fp4sim[torch,test]",
    "report": "fp4sim[report]",
    "simulate": "fp4sim[report]",
    "demo": "fp4sim",
}


def _install_hint(command: str | None, err: ModuleNotFoundError) -> str | None:
    """The line to print when ``err`` is a missing optional dependency, else None."""
    root = (err.name or "").split(".")[0]
    if root not in OPTIONAL_DEPENDENCIES:
        return None
    extra = SUBCOMMAND_EXTRAS.get(command or "", "fp4sim[all]")
    if root == "safetensors":  # only `check --inputs FILE.safetensors` reads it
        extra = "safetensors"
    return f"fp4sim {command}: needs {root}, which is not installed; pip install '{extra}'"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the module of ``command`` (if given) is imported."""
    parser = argparse.ArgumentParser(
        prog="fp4sim",
        description="Numerical verification and simulation for FP4 (E2M1) attention.",
    )
    parser.add_argument("--version", action="version", version=f"fp4sim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure_parser(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


# Exit status when a write to stdout failed because its reader left: 128 + SIGPIPE, what a
# tool killed by the closed pipe reports (POSIX shells), distinct from 0, 1 and 2.
EXIT_CLOSED_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. A closed stdout (`fp4sim ... | head`) ends it quietly with
    EXIT_CLOSED_PIPE whenever a write failed, so a lost result line never reads as success."""
    try:
        try:
            code = _main(argv)
        finally:  # also after argparse's SystemExit (--help, usage errors)
            sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
    except BrokenPipeError:
        # Python's own flush at exit would fail again: stdout now points at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        return int(args._run(args))
    except ModuleNotFoundError as err:
        hint = _install_hint(command, err)
        if hint is None:
            raise
        # a missing extra is a usage problem of this install, not a failed check: exit 2
        print(hint, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
