"""Loading a user's kernel from ``MODULE:ATTR`` for ``fp4sim check``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any


class UsageError(Exception):
    """Bad command-line use: unimportable kernel, not callable, wrong signature (exit 2)."""




def load_kernel(path: str, n_args: int) -> Callable[..., Any]:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and check it takes ``n_args`` positional
    arguments. The current directory is put on ``sys.path`` (as ``python -m`` does)."""
    if ":" not in path:
        raise UsageError(
            f"--kernel must be MODULE:ATTR (e.g. mypkg.kernels:quantize), got {path!r}"
        )
    module_name, attr_path = path.split(":", 1)
    if not module_name or not attr_path:
        raise UsageError(f"--kernel must be MODULE:ATTR, got {path!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is a usage problem for the CLI
        raise UsageError(
            f"cannot import module {module_name!r}: {type(err).__name__}: {err}"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{path} is not callable (got {type(obj).__name__})")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins and some extension callables have no signature: trust them
    try:
        signature.bind(*range(n_args))
    except TypeError as err:
        raise UsageError(
            f"{path}{signature} cannot be called with {n_args} positional argument(s): {err}"
        ) from err
    return obj

