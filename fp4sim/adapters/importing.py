"""Import a public kernel's package on first use, with one clear line when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

README_SECTION = "README 'Checking a public kernel'"


class KernelPackageMissing(ImportError):
    """The public kernel's package is not importable (put it on PYTHONPATH)."""


def import_kernel_module(module: str, kernel: str) -> ModuleType:
    """``importlib.import_module(module)``, or KernelPackageMissing naming ``kernel``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise KernelPackageMissing(
            f"{kernel} is not importable ({module}: {err}): put its package on PYTHONPATH"
            f" (see {README_SECTION})"
        ) from err
