"""One loader for user kernels named ``MODULE:ATTR``, shared by check, report and simulate.

Import rule: the current folder comes first on ``sys.path``, as with ``python -m pytest``, so
a user's own ``kernels/`` package or ``reference.py`` is found before anything installed (the
suite itself lives under the single name ``fp4sim``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fp4sim.harness.spec import KernelSpec, UsageError, merge_spec

__all__ = ["LoadedKernel", "load_attention_kernel", "load_kernel", "to_bhld", "to_kernel_layout"]


def _cwd_first() -> None:
    cwd = os.getcwd()
    # "" also means the current folder; keep it but make sure the absolute path leads
    if not sys.path or sys.path[0] != cwd:
        if cwd in sys.path:
            sys.path.remove(cwd)
        sys.path.insert(0, cwd)


def load_kernel(target: str, n_args: int) -> Callable[..., Any]:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and check that it takes ``n_args``
    positional arguments; raises ``UsageError`` with one clear line otherwise."""
    if not isinstance(target, str) or ":" not in target:
        raise UsageError(
            f"--kernel must be MODULE:ATTR (e.g. mypkg.kernels:attention), got {target!r}"
        )
    module_name, attr_path = target.split(":", 1)
    if not module_name or not attr_path:
        raise UsageError(f"--kernel must be MODULE:ATTR, got {target!r}")
    _cwd_first()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is a usage problem for the CLI
        raise UsageError(
            f"cannot import module {module_name!r} (from {os.getcwd()}):"
            f" {type(err).__name__}: {err}"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target} is not callable (got {type(obj).__name__})")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins and some extension callables have no signature: trust them
    try:
        signature.bind(*range(n_args))
    except TypeError as err:
        raise UsageError(
            f"{target}{signature} cannot be called with {n_args} positional argument(s): {err}"
        ) from err
    return obj


def to_kernel_layout(x: Any, layout: str) -> Any:
    """A BHLD tensor in the kernel's layout (a view: BLHD is a transpose of dims 1 and 2)."""
    return x if layout == "bhld" else x.transpose(1, 2)


def to_bhld(x: Any, layout: str) -> Any:
    """The kernel's output, in the kernel's layout, back to BHLD."""
    return x if layout == "bhld" else x.transpose(1, 2)


@dataclass
class LoadedKernel:
    """An attention kernel with its declared capabilities; called with BHLD tensors."""

    target: str
    fn: Callable[..., Any]
    spec: KernelSpec

    def __call__(self, q: Any, k: Any, v: Any, causal: bool, sm_scale: float | None) -> Any:
        layout = self.spec.layout
        if layout == "blhd":
            # a contiguous BLHD copy: kernels taking BLHD usually index strides directly
            q, k, v = (to_kernel_layout(t, layout).contiguous() for t in (q, k, v))
        o = self.fn(q, k, v, causal, sm_scale)
        if layout != "bhld" and hasattr(o, "transpose"):
            o = to_bhld(o, layout)
        return o


def load_attention_kernel(target: str, overrides: Mapping[str, Any] | None = None) -> LoadedKernel:
    """Load ``fn(q, k, v, causal, sm_scale) -> o`` and its spec: the ``fp4sim_spec``
    attribute of the callable, then ``overrides`` (from the command line)."""
    fn = load_kernel(target, 5)
    spec = merge_spec(getattr(fn, "fp4sim_spec", None), overrides, target)
    return LoadedKernel(target, fn, spec)
